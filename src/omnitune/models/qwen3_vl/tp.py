"""Qwen3-VL / Qwen3-VL-MoE tensor-parallel plan (see omnitune.parallel.tp).

Text decoder: Qwen2's layout plus q_norm / k_norm, which act per head on the local heads
(``head_norm``: their weight gradient is summed over TP). MoE layers: experts and router are NOT
sharded over TP (replicated: every TP rank runs them on the same tokens; expert parallelism splits
them instead); dense MLP layers (``mlp_only_layers``) are colwise / rowwise.
ViT: fused qkv split per head, MLP linear_fc1 / linear_fc2, merger and DeepStack mergers.
"""
from __future__ import annotations

from torch import nn


def qwen3_text_plan(model: nn.Module, prefix: str = "model.language_model", lm_head: str = "lm_head") -> dict:
    layers = f"{prefix}.layers.*"
    plan = {
        f"{prefix}.embed_tokens": "embedding",
        layers: "sp_layer",
        f"{layers}.input_layernorm": "sp_norm",
        f"{layers}.post_attention_layernorm": "sp_norm",
        f"{layers}.self_attn": "sp_gather",
        f"{layers}.self_attn.q_proj": "colwise",
        f"{layers}.self_attn.k_proj": "colwise",
        f"{layers}.self_attn.v_proj": "colwise",
        f"{layers}.self_attn.q_norm": "head_norm",
        f"{layers}.self_attn.k_norm": "head_norm",
        f"{layers}.self_attn.o_proj": "rowwise_seq",
    }
    for i, layer in enumerate(model.get_submodule(f"{prefix}.layers")):
        mlp = f"{prefix}.layers.{i}.mlp"
        if hasattr(layer.mlp, "experts"):      # sparse MoE block: replicated over TP
            plan[mlp] = "sp_gather_scatter"
        else:
            plan.update({mlp: "sp_gather", f"{mlp}.gate_proj": "colwise", f"{mlp}.up_proj": "colwise",
                         f"{mlp}.down_proj": "rowwise_seq"})
    plan[lm_head] = "lm_head"
    return plan


def vision_plan(model: nn.Module, prefix: str = "model.visual") -> dict:
    blocks = f"{prefix}.blocks.*"
    plan = {
        f"{blocks}.attn": "heads:num_heads",
        f"{blocks}.attn.qkv": "colwise_qkv",
        f"{blocks}.attn.proj": "rowwise",
        f"{blocks}.mlp.linear_fc1": "colwise",
        f"{blocks}.mlp.linear_fc2": "rowwise",
        f"{prefix}.merger.linear_fc1": "colwise",
        f"{prefix}.merger.linear_fc2": "rowwise",
    }
    if len(getattr(model.get_submodule(prefix), "deepstack_merger_list", ())):
        plan.update({f"{prefix}.deepstack_merger_list.*.linear_fc1": "colwise",
                     f"{prefix}.deepstack_merger_list.*.linear_fc2": "rowwise"})
    return plan


def tp_plan(model: nn.Module) -> dict:
    return {**vision_plan(model), **qwen3_text_plan(model)}
