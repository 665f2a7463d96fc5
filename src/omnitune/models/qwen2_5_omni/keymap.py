"""Qwen2.5-Omni: HF weight names <-> MindSpeed-MM ("mm") names, fusions and TP splits.

The HF folder is the full model (``thinker.*``, ``talker.*``, ``token2wav.*``); the mm checkpoint
holds the thinker only (vision, audio, LLM); mm_to_hf writes the other weights back untouched.
- ViT: q, k, v (weight, bias) interleaved per head [q_h, k_h, v_h]; gate/up GLU -> linear_fc1.
- Audio (Whisper-style): q, k, v weights interleaved per head; the biases of q and v with a zero
  k bias inserted (k_proj has no bias); out_proj -> linear_proj, fc1/fc2; conv1/conv2 and
  audio_bos_eos_token on the audio's first stage, ln_post/proj on its last.
- LLM: as Qwen2-VL. TP: audio qkv/fc1 column (dim 0), out_proj/fc2 row.
"""
from __future__ import annotations

from omnitune.convert.layout import ConvertError, ModuleSchema
from omnitune.convert.table import Merge, Rename, Sizes, TableKeymap
from omnitune.models.qwen2_5_vl import keymap as vl

AUD = "audio_encoder.encoder.blocks.layers.{i}."

RENAMES = [r for r in vl.RENAMES] + [
    Rename("audio_tower.layers.{i}.fc1", AUD + "mlp.linear_fc1"),
    Rename("audio_tower.layers.{i}.fc2", AUD + "mlp.linear_fc2"),
    Rename("audio_tower.layers.{i}.final_layer_norm", AUD + "pre_mlp_layernorm"),
    Rename("audio_tower.layers.{i}.self_attn.out_proj", AUD + "self_attention.linear_proj"),
    Rename("audio_tower.layers.{i}.self_attn_layer_norm", AUD + "input_layernorm"),
    Rename("audio_tower.ln_post", "audio_encoder.encoder.ln_post"),
    Rename("audio_tower.proj", "audio_encoder.encoder.proj"),
    Rename("audio_tower.audio_bos_eos_token", "audio_encoder.encoder.audio_bos_eos_token"),
    Rename("audio_tower.conv1", "audio_encoder.encoder.conv1"),
    Rename("audio_tower.conv2", "audio_encoder.encoder.conv2"),
]

MERGES = [
    Merge("qkv", tuple(f"visual.blocks.{{i}}.attn.{x}.{{p}}" for x in "qkv"), vl.VIT + "self_attention.linear_qkv.{p}",
          groups=lambda s: s.vit_heads, rows=lambda s: (s.vit_dim // s.vit_heads,) * 3),
    *[m for m in vl.MERGES if m.kind != "perhead"],
    Merge("qkv", tuple(f"audio_tower.layers.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv"),
          AUD + "self_attention.linear_qkv.{p}", groups=lambda s: s.audio_heads,
          rows=lambda s: (s.audio_dim // s.audio_heads,) * 3, params=("weight",)),
    Merge("qv", ("audio_tower.layers.{i}.self_attn.q_proj.{p}", "audio_tower.layers.{i}.self_attn.v_proj.{p}"),
          AUD + "self_attention.linear_qkv.{p}", groups=lambda s: s.audio_heads,
          rows=lambda s: (s.audio_dim // s.audio_heads,) * 3, params=("bias",)),
]

A_ = r"audio_encoder\.encoder\.blocks\.layers\.\d+\."
TP_RULES = vl.TP_RULES + [
    (A_ + r"self_attention\.linear_qkv\.(weight|bias)", "column"),
    (A_ + r"self_attention\.linear_proj\.weight", "row"),
    (A_ + r"mlp\.linear_fc1\.(weight|bias)", "column"),
    (A_ + r"mlp\.linear_fc2\.weight", "row"),
]


def sizes_from_config(cfg: dict) -> Sizes:
    th = cfg.get("thinker_config") or cfg  # full folder or the thinker's own config
    s = vl.sizes_from_config(th)
    a = th.get("audio_config")
    if not a:
        raise ConvertError("config.json: thinker_config.audio_config is missing")
    s.audio_layers = int(a.get("encoder_layers") or a["num_hidden_layers"])
    s.audio_heads = int(a["encoder_attention_heads"])
    s.audio_dim = int(a["d_model"])
    return s


def audio_schema(sizes) -> ModuleSchema:
    return ModuleSchema(name="audio", pp_field="audio_pp_layers", tp_field="audio_tp_size", key_prefix="audio_encoder.",
                        layer_prefix="audio_encoder.encoder.blocks.layers.",
                        firsts=("audio_encoder.encoder.conv", "audio_encoder.encoder.audio_bos_eos_token"),
                        lasts=("audio_encoder.encoder.proj", "audio_encoder.encoder.ln_post"),
                        num_layers=sizes.audio_layers)


def divisibility(sizes) -> list[tuple[str, int, str]]:
    return vl.divisibility(sizes) + [("audio_tp_size", sizes.audio_heads, "audio_config.encoder_attention_heads")]


KEYMAP = TableKeymap(
    name="Qwen2.5-Omni", renames=RENAMES, merges=MERGES, tp_rules=TP_RULES,
    module_schemas=lambda s: [vl.vision_schema(s), audio_schema(s), vl.llm_schema(s)],
    sizes_from_config=sizes_from_config, divisibility=divisibility,
    layout_fields={"llm_pp_layers": "llm_layers", "vit_pp_layers": "vit_layers", "audio_pp_layers": "audio_layers"},
    aliases=[("model.visual.", "visual."), ("model.audio_tower.", "audio_tower."), ("model.language_model.", "model.")],
    folder_prefix="thinker.",
)
