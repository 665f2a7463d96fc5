"""Qwen2.5-VL tensor-parallel plan (see omnitune.parallel.tp): Qwen2 text decoder; the ViT has a
fused qkv and a SwiGLU MLP."""
from __future__ import annotations

from torch import nn

from omnitune.models.qwen2_vl.tp import qwen2_text_plan


def vision_plan(model: nn.Module, prefix: str = "model.visual", fused_qkv: bool = True) -> dict:
    blocks = f"{prefix}.blocks.*"
    attn = ({f"{blocks}.attn.qkv": "colwise_qkv"} if fused_qkv else
            {f"{blocks}.attn.{p}": "colwise" for p in ("q", "k", "v")})
    return {
        f"{blocks}.attn": "heads:num_heads",
        **attn,
        f"{blocks}.attn.proj": "rowwise",
        f"{blocks}.mlp.gate_proj": "colwise",
        f"{blocks}.mlp.up_proj": "colwise",
        f"{blocks}.mlp.down_proj": "rowwise",
        f"{prefix}.merger.mlp.0": "colwise",
        f"{prefix}.merger.mlp.2": "rowwise",
    }


def tp_plan(model: nn.Module) -> dict:
    return {**vision_plan(model), **qwen2_text_plan(model)}
