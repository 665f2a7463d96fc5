"""Qwen2-VL: HF weight names <-> MindSpeed-MM ("mm") names, fusions and TP splits.

One truth for the converter (omnitune.convert.qwen2vl) and, later, the trainer.

HF names are the on-disk (transformers 4.x style) ones: ``visual.blocks.{i}...``,
``model.layers.{i}...``, ``model.embed_tokens``, ``lm_head``. Folders written with the newer
``model.visual.`` / ``model.language_model.`` prefixes are normalised on read and restored on write.

Fusions (as MindSpeed-MM's converters write them):
- LLM q/k/v (weight and bias) -> ``linear_qkv`` interleaved per KV group [q_g, k_g, v_g];
- LLM gate/up -> ``linear_fc1`` = cat([gate, up]);
- ViT fused qkv: HF [q | k | v] re-laid per head [q_h, k_h, v_h].
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from omnitune.convert.layout import ConvertError, ModuleSchema, cat_rows, deinterleave_qkv, interleave_qkv

# ------------------------------------------------------------------ plain renames (HF regex, mm template)
RENAMES: list[tuple[str, str]] = [
    (r"visual\.patch_embed\.proj\.(\w+)", r"image_encoder.encoder.patch_embed.proj.\1"),
    (r"visual\.blocks\.(\d+)\.norm1\.(\w+)", r"image_encoder.encoder.blocks.layers.\1.input_layernorm.\2"),
    (r"visual\.blocks\.(\d+)\.norm2\.(\w+)", r"image_encoder.encoder.blocks.layers.\1.pre_mlp_layernorm.\2"),
    (r"visual\.blocks\.(\d+)\.attn\.proj\.(\w+)", r"image_encoder.encoder.blocks.layers.\1.self_attention.linear_proj.\2"),
    (r"visual\.blocks\.(\d+)\.mlp\.fc1\.(\w+)", r"image_encoder.encoder.blocks.layers.\1.mlp.linear_fc1.\2"),
    (r"visual\.blocks\.(\d+)\.mlp\.fc2\.(\w+)", r"image_encoder.encoder.blocks.layers.\1.mlp.linear_fc2.\2"),
    (r"visual\.merger\.ln_q\.(\w+)", r"image_encoder.projector.layernorm.\1"),
    (r"visual\.merger\.mlp\.0\.(\w+)", r"image_encoder.projector.encoder.linear_fc1.\1"),
    (r"visual\.merger\.mlp\.2\.(\w+)", r"image_encoder.projector.encoder.linear_fc2.\1"),
    (r"model\.embed_tokens\.weight", r"text_decoder.embedding.word_embeddings.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"text_decoder.decoder.layers.\1.input_layernorm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"text_decoder.decoder.layers.\1.pre_mlp_layernorm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"text_decoder.decoder.layers.\1.self_attention.linear_proj.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"text_decoder.decoder.layers.\1.mlp.linear_fc2.weight"),
    (r"model\.norm\.weight", r"text_decoder.decoder.final_layernorm.weight"),
    (r"lm_head\.weight", r"text_decoder.output_layer.weight"),
]
VIT_QKV = (r"visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
           "image_encoder.encoder.blocks.layers.{i}.self_attention.linear_qkv.{p}")
LLM_QKV = (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
           "text_decoder.decoder.layers.{i}.self_attention.linear_qkv.{p}")
LLM_GLU = (r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight",
           "text_decoder.decoder.layers.{i}.mlp.linear_fc1.weight")

# ------------------------------------------------------------------ TP split of mm keys
# "column" = dim 0, "row" = dim 1, "glu" = [gate shard; up shard]; anything else is replicated.
TP_RULES: list[tuple[str, str]] = [
    (r"text_decoder\.embedding\.word_embeddings\.weight", "column"),
    (r"text_decoder\.output_layer\.weight", "column"),
    (r"text_decoder\.decoder\.layers\.\d+\.self_attention\.linear_qkv\.(weight|bias)", "column"),
    (r"text_decoder\.decoder\.layers\.\d+\.self_attention\.linear_proj\.weight", "row"),
    (r"text_decoder\.decoder\.layers\.\d+\.mlp\.linear_fc1\.weight", "glu"),
    (r"text_decoder\.decoder\.layers\.\d+\.mlp\.linear_fc2\.weight", "row"),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.self_attention\.linear_qkv\.(weight|bias)", "column"),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.self_attention\.linear_proj\.weight", "row"),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.mlp\.linear_fc1\.(weight|bias)", "column"),
    (r"image_encoder\.encoder\.blocks\.layers\.\d+\.mlp\.linear_fc2\.weight", "row"),
    (r"image_encoder\.projector\.encoder\.linear_fc1\.(weight|bias)", "column"),
    (r"image_encoder\.projector\.encoder\.linear_fc2\.weight", "row"),
]
_TP_RULES = [(re.compile(p), k) for p, k in TP_RULES]


def tp_rule(mm_key: str) -> Optional[str]:
    for p, kind in _TP_RULES:
        if p.fullmatch(mm_key):
            return kind
    return None


OUTPUT_LAYER = "text_decoder.output_layer.weight"
WORD_EMBEDDINGS = "text_decoder.embedding.word_embeddings.weight"


# ------------------------------------------------------------------ sizes from config.json
@dataclass(frozen=True)
class Sizes:
    llm_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vit_layers: int
    vit_heads: int
    vit_dim: int
    tie: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Sizes":
        """config.json as a dict; transformers 5 (text_config) and 4.x (top-level) layouts."""
        text = cfg.get("text_config") or {}

        def t(name, default=None):
            if name in text and text[name] is not None:
                return text[name]
            if name in cfg and cfg[name] is not None:
                return cfg[name]
            if default is not None:
                return default
            raise ConvertError(f"config.json: text field {name!r} is missing")

        v = cfg.get("vision_config")
        if not v:
            raise ConvertError("config.json: vision_config is missing")
        heads = int(t("num_attention_heads"))
        hidden = int(t("hidden_size"))
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(llm_layers=int(t("num_hidden_layers")), heads=heads, kv_heads=int(t("num_key_value_heads")),
                   head_dim=int(t("head_dim", hidden // heads)), vit_layers=int(v["depth"]),
                   vit_heads=int(v["num_heads"]), vit_dim=int(v["embed_dim"]), tie=bool(tie))


def modules(sizes: Sizes) -> list[ModuleSchema]:
    return [
        ModuleSchema(name="vision", pp_field="vit_pp_layers", tp_field="vit_tp_size", key_prefix="image_encoder.",
                     layer_prefix="image_encoder.encoder.blocks.layers.",
                     firsts=("image_encoder.encoder.patch_embed.",), lasts=("image_encoder.projector.",),
                     num_layers=sizes.vit_layers),
        ModuleSchema(name="LLM", pp_field="llm_pp_layers", tp_field="tp_size", key_prefix="text_decoder.",
                     layer_prefix="text_decoder.decoder.layers.", firsts=("text_decoder.embedding.",),
                     lasts=("text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."),
                     num_layers=sizes.llm_layers),
    ]


def tp_divisibility(sizes: Sizes) -> list[tuple[str, int, str]]:
    """(ParallelConfig TP field, count that must divide by it, config field name)."""
    return [("tp_size", sizes.kv_heads, "num_key_value_heads"),
            ("tp_size", sizes.heads, "num_attention_heads"),
            ("vit_tp_size", sizes.vit_heads, "vision_config.num_heads")]


# ------------------------------------------------------------------ HF key styles
_NEW_STYLE = [("model.visual.", "visual."), ("model.language_model.", "model.")]


def normalize_hf_keys(sd: dict) -> tuple[dict, bool]:
    """Newer ``model.visual.``/``model.language_model.`` names -> the legacy ones; returns (sd, was_new)."""
    if not any(k.startswith(("model.visual.", "model.language_model.")) for k in sd):
        return sd, False
    out = {}
    for k, v in sd.items():
        for new, old in _NEW_STYLE:
            if k.startswith(new):
                k = old + k[len(new):]
                break
        out[k] = v
    return out, True


def denormalize_hf_key(k: str) -> str:
    for new, old in _NEW_STYLE:
        if k.startswith(old):
            return new + k[len(old):]
    return k


# ------------------------------------------------------------------ the conversions
def _per_head(qkv: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """ViT HF [q | k | v] -> [q_h, k_h, v_h] for each head h."""
    return interleave_qkv(*torch.split(qkv, [dim, dim, dim], dim=0), groups=heads)


def _from_per_head(qkv: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    hd = dim // heads
    return torch.cat(deinterleave_qkv(qkv, heads, (hd, hd, hd)), dim=0)


def hf_to_mm(hf: dict, sizes: Sizes, pp_size: int) -> dict:
    """Full HF state dict (legacy names) -> full mm state dict (no TP/PP split).
    Tied embeddings with pp_size > 1 get an output_layer copy of word_embeddings."""
    hf, _ = normalize_hf_keys(hf)
    out, qkv, glu = {}, {}, {}
    renames, (vit_qkv, llm_qkv, llm_glu) = _FORWARD
    for key, t in hf.items():
        if m := vit_qkv.fullmatch(key):
            out[VIT_QKV[1].format(i=m[1], p=m[2])] = _per_head(t, sizes.vit_heads, sizes.vit_dim)
            continue
        if m := llm_qkv.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
            continue
        if m := llm_glu.fullmatch(key):
            glu.setdefault(m[1], {})[m[2]] = t
            continue
        out[_rename(key, renames, "HF")] = t
    for (i, p), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConvertError(f"HF layer {i}: q/k/v_proj.{p} incomplete (have {sorted(parts)})")
        out[LLM_QKV[1].format(i=i, p=p)] = interleave_qkv(parts["q"], parts["k"], parts["v"], sizes.kv_heads)
    for i, parts in glu.items():
        if set(parts) != {"gate", "up"}:
            raise ConvertError(f"HF layer {i}: gate/up_proj incomplete (have {sorted(parts)})")
        out[LLM_GLU[1].format(i=i)] = cat_rows([parts["gate"], parts["up"]])
    if sizes.tie and pp_size > 1 and OUTPUT_LAYER not in out and WORD_EMBEDDINGS in out:
        out[OUTPUT_LAYER] = out[WORD_EMBEDDINGS]
    return out


def mm_to_hf(mm: dict, sizes: Sizes) -> dict:
    """Full mm state dict -> HF state dict (legacy names). output_layer is kept as lm_head; the
    caller drops it when the HF folder does not store lm_head (tied)."""
    inv = _INVERSE
    out = {}
    q_rows = sizes.heads // sizes.kv_heads * sizes.head_dim
    for key, t in mm.items():
        if m := re.fullmatch(r"image_encoder\.encoder\.blocks\.layers\.(\d+)\.self_attention\.linear_qkv\.(weight|bias)", key):
            out[f"visual.blocks.{m[1]}.attn.qkv.{m[2]}"] = _from_per_head(t, sizes.vit_heads, sizes.vit_dim)
            continue
        if m := re.fullmatch(r"text_decoder\.decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.(weight|bias)", key):
            q, k, v = deinterleave_qkv(t, sizes.kv_heads, (q_rows, sizes.head_dim, sizes.head_dim))
            for n, x in zip("qkv", (q, k, v)):
                out[f"model.layers.{m[1]}.self_attn.{n}_proj.{m[2]}"] = x.contiguous()
            continue
        if m := re.fullmatch(r"text_decoder\.decoder\.layers\.(\d+)\.mlp\.linear_fc1\.weight", key):
            gate, up = torch.chunk(t, 2, dim=0)
            out[f"model.layers.{m[1]}.mlp.gate_proj.weight"] = gate.contiguous()
            out[f"model.layers.{m[1]}.mlp.up_proj.weight"] = up.contiguous()
            continue
        out[_rename(key, inv, "mm")] = t
    return out


def _to_regex(template: str) -> str:
    """mm template 'a.\\1.b.\\2' -> regex; groups in order of appearance."""
    s = re.escape(template)
    s = s.replace(re.escape(r"\1"), r"(\d+|\w+)").replace(re.escape(r"\2"), r"(\w+)")
    return s


def _to_template(hf_regex: str) -> str:
    """HF regex 'visual\\.blocks\\.(\\d+)\\.x\\.(\\w+)' -> 'visual.blocks.\\1.x.\\2'."""
    n = 0

    def repl(_m):
        nonlocal n
        n += 1
        return f"\\{n}"
    return re.sub(r"\([^)]*\)", repl, hf_regex).replace("\\.", ".")


def _rename(key: str, table, what: str) -> str:
    """The first (regex, replacement) of ``table`` matching ``key``, applied."""
    for p, r in table:
        if p.fullmatch(key):
            return p.sub(r, key)
    raise ConvertError(f"{what} weight {key!r} is not known to the Qwen2-VL keymap")


def sizes_from_layout(parallel) -> Sizes:
    """Layer counts from a layout (resplit without an HF folder); head counts unknown (0)."""
    from omnitune.convert.layout import flat

    return Sizes(llm_layers=sum(flat(parallel.llm_pp_layers)), heads=0, kv_heads=0, head_dim=0,
                 vit_layers=sum(flat(parallel.vit_pp_layers)), vit_heads=0, vit_dim=0, tie=False)


# compiled once (the converters call the two functions per layer group)
_FORWARD = ([(re.compile(p), r) for p, r in RENAMES], tuple(re.compile(x[0]) for x in (VIT_QKV, LLM_QKV, LLM_GLU)))
_INVERSE = [(re.compile(_to_regex(r)), _to_template(p)) for p, r in RENAMES]
