"""Qwen2.5-Omni thinker tensor-parallel plan (see omnitune.parallel.tp): Qwen2 text decoder,
Qwen2.5-VL-style ViT with separate q/k/v, Whisper-style audio encoder (q/k/v colwise, out_proj
rowwise, fc1/fc2). The audio convolutions, positional tables and output projection stay replicated."""
from __future__ import annotations

from torch import nn

from omnitune.models.qwen2_5_vl.tp import vision_plan
from omnitune.models.qwen2_vl.tp import qwen2_text_plan


def audio_plan(model: nn.Module, prefix: str = "model.audio_tower") -> dict:
    layers = f"{prefix}.layers.*"
    return {
        f"{layers}.self_attn": "heads:num_heads",
        f"{layers}.self_attn.q_proj": "colwise",
        f"{layers}.self_attn.k_proj": "colwise",
        f"{layers}.self_attn.v_proj": "colwise",
        f"{layers}.self_attn.out_proj": "rowwise",
        f"{layers}.fc1": "colwise",
        f"{layers}.fc2": "rowwise",
    }


def tp_plan(model: nn.Module) -> dict:
    return {**vision_plan(model, fused_qkv=False), **audio_plan(model), **qwen2_text_plan(model)}
