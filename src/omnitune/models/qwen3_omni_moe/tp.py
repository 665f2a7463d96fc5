"""Qwen3-Omni-MoE thinker tensor-parallel plan (see omnitune.parallel.tp): Qwen3 MoE text decoder
(experts / router replicated over TP), Qwen3-VL-style ViT whose mergers are ``mlp`` lists, and
the audio encoder's transformer layers (q/k/v colwise, out_proj rowwise, fc1/fc2). The audio conv
front-end and output projections stay replicated."""
from __future__ import annotations

from torch import nn

from omnitune.models.qwen2_5_omni.tp import audio_plan
from omnitune.models.qwen3_vl.tp import qwen3_text_plan, vit_blocks_plan


def vision_plan(model: nn.Module, prefix: str = "model.visual") -> dict:
    plan = {**vit_blocks_plan(prefix), f"{prefix}.merger.mlp.0": "colwise", f"{prefix}.merger.mlp.2": "rowwise"}
    if len(getattr(model.get_submodule(prefix), "merger_list", ())):
        plan.update({f"{prefix}.merger_list.*.mlp.0": "colwise", f"{prefix}.merger_list.*.mlp.2": "rowwise"})
    return plan


def tp_plan(model: nn.Module) -> dict:
    return {**vision_plan(model), **audio_plan(model), **qwen3_text_plan(model)}
