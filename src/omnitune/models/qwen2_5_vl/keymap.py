"""Qwen2.5-VL: HF weight names <-> MindSpeed-MM ("mm") names, fusions and TP splits.

As Qwen2-VL (LLM q/k/v interleaved per KV group, gate/up -> linear_fc1, ViT fused qkv re-laid per
head), except that the ViT MLP is a GLU: gate/up (weight and bias) -> linear_fc1 = cat([gate, up])
with a GLU TP split, down_proj -> linear_fc2; the ViT norms are RMSNorms (weight only). The folder
uses the legacy names (``visual.``, ``model.``, ``lm_head``); ``model.visual.`` /
``model.language_model.`` names are accepted and written back the same way.
"""
from __future__ import annotations

from omnitune.convert.layout import ConvertError, ModuleSchema
from omnitune.convert.table import Merge, Rename, Sizes, TableKeymap

VIT = "image_encoder.encoder.blocks.layers.{i}."
LLM = "text_decoder.decoder.layers.{i}."

RENAMES = [
    Rename("visual.patch_embed.proj", "image_encoder.encoder.patch_embed.proj"),
    Rename("visual.blocks.{i}.norm1", VIT + "input_layernorm"),
    Rename("visual.blocks.{i}.norm2", VIT + "pre_mlp_layernorm"),
    Rename("visual.blocks.{i}.attn.proj", VIT + "self_attention.linear_proj"),
    Rename("visual.blocks.{i}.mlp.down_proj", VIT + "mlp.linear_fc2"),
    Rename("visual.merger.ln_q", "image_encoder.projector.layernorm"),
    Rename("visual.merger.mlp.0", "image_encoder.projector.encoder.linear_fc1"),
    Rename("visual.merger.mlp.2", "image_encoder.projector.encoder.linear_fc2"),
    Rename("model.embed_tokens", "text_decoder.embedding.word_embeddings"),
    Rename("model.layers.{i}.input_layernorm", LLM + "input_layernorm"),
    Rename("model.layers.{i}.post_attention_layernorm", LLM + "pre_mlp_layernorm"),
    Rename("model.layers.{i}.self_attn.o_proj", LLM + "self_attention.linear_proj"),
    Rename("model.layers.{i}.mlp.down_proj", LLM + "mlp.linear_fc2"),
    Rename("model.norm", "text_decoder.decoder.final_layernorm"),
    Rename("lm_head", "text_decoder.output_layer"),
]

MERGES = [
    Merge("perhead", ("visual.blocks.{i}.attn.qkv.{p}",), VIT + "self_attention.linear_qkv.{p}",
          groups=lambda s: s.vit_heads),
    Merge("glu", ("visual.blocks.{i}.mlp.gate_proj.{p}", "visual.blocks.{i}.mlp.up_proj.{p}"), VIT + "mlp.linear_fc1.{p}"),
    Merge("qkv", tuple(f"model.layers.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv"), LLM + "self_attention.linear_qkv.{p}",
          groups=lambda s: s.kv_heads, rows=lambda s: (s.heads // s.kv_heads * s.head_dim, s.head_dim, s.head_dim)),
    Merge("glu", ("model.layers.{i}.mlp.gate_proj.{p}", "model.layers.{i}.mlp.up_proj.{p}"), LLM + "mlp.linear_fc1.{p}"),
]

L_, V_ = r"text_decoder\.decoder\.layers\.\d+\.", r"image_encoder\.encoder\.blocks\.layers\.\d+\."
TP_RULES = [
    (r"text_decoder\.embedding\.word_embeddings\.weight", "column"),
    (r"text_decoder\.output_layer\.weight", "column"),
    (L_ + r"self_attention\.linear_qkv\.(weight|bias)", "column"),
    (L_ + r"self_attention\.linear_proj\.weight", "row"),
    (L_ + r"mlp\.linear_fc1\.weight", "glu"),
    (L_ + r"mlp\.linear_fc2\.weight", "row"),
    (V_ + r"self_attention\.linear_qkv\.(weight|bias)", "column"),
    (V_ + r"self_attention\.linear_proj\.weight", "row"),
    (V_ + r"mlp\.linear_fc1\.(weight|bias)", "glu"),
    (V_ + r"mlp\.linear_fc2\.weight", "row"),
    (r"image_encoder\.projector\.encoder\.linear_fc1\.(weight|bias)", "column"),
    (r"image_encoder\.projector\.encoder\.linear_fc2\.weight", "row"),
]


def text_sizes(cfg: dict) -> dict:
    """LLM sizes from a config dict (transformers 5 text_config or 4.x top level)."""
    text = cfg.get("text_config") or {}

    def t(name, default=None):
        for src in (text, cfg):
            if src.get(name) is not None:
                return src[name]
        if default is not None:
            return default
        raise ConvertError(f"config.json: text field {name!r} is missing")

    heads, hidden = int(t("num_attention_heads")), int(t("hidden_size"))
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return dict(llm_layers=int(t("num_hidden_layers")), heads=heads, kv_heads=int(t("num_key_value_heads")),
                head_dim=int(t("head_dim", hidden // heads)), tie=bool(tie))


def sizes_from_config(cfg: dict) -> Sizes:
    v = cfg.get("vision_config")
    if not v:
        raise ConvertError("config.json: vision_config is missing")
    return Sizes(**text_sizes(cfg), vit_layers=int(v["depth"]), vit_heads=int(v["num_heads"]),
                 vit_dim=int(v["hidden_size"]), audio_layers=0, audio_heads=0, audio_dim=0)


def vision_schema(sizes) -> ModuleSchema:
    return ModuleSchema(name="vision", pp_field="vit_pp_layers", tp_field="vit_tp_size", key_prefix="image_encoder.",
                        layer_prefix="image_encoder.encoder.blocks.layers.",
                        firsts=("image_encoder.encoder.patch_embed.",), lasts=("image_encoder.projector.",),
                        num_layers=sizes.vit_layers)


def llm_schema(sizes) -> ModuleSchema:
    return ModuleSchema(name="LLM", pp_field="llm_pp_layers", tp_field="tp_size", key_prefix="text_decoder.",
                        layer_prefix="text_decoder.decoder.layers.", firsts=("text_decoder.embedding.",),
                        lasts=("text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."),
                        num_layers=sizes.llm_layers)


def divisibility(sizes) -> list[tuple[str, int, str]]:
    return [("tp_size", sizes.kv_heads, "num_key_value_heads"),
            ("tp_size", sizes.heads, "num_attention_heads"),
            ("vit_tp_size", sizes.vit_heads, "vision_config.num_heads")]


KEYMAP = TableKeymap(
    name="Qwen2.5-VL", renames=RENAMES, merges=MERGES, tp_rules=TP_RULES,
    module_schemas=lambda s: [vision_schema(s), llm_schema(s)], sizes_from_config=sizes_from_config,
    divisibility=divisibility, layout_fields={"llm_pp_layers": "llm_layers", "vit_pp_layers": "vit_layers"},
    aliases=[("model.visual.", "visual."), ("model.language_model.", "model.")],
)
