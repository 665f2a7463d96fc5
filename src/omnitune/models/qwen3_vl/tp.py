"""Qwen3-VL / Qwen3-VL-MoE tensor-parallel plan (see omnitune.parallel.tp).

Text decoder: Qwen2's layout plus q_norm / k_norm, which act per head on the local heads
(``head_norm``: their weight gradient is summed over TP). MoE layers: experts and router are NOT
sharded over TP (replicated: every TP rank runs them on the same tokens; expert parallelism splits
them instead); dense MLP layers (``mlp_only_layers``) are colwise / rowwise.
ViT: fused qkv split per head, MLP linear_fc1 / linear_fc2, merger and DeepStack mergers.
"""
from __future__ import annotations

from torch import nn

from omnitune.models.qwen2_vl.tp import decoder_attention_plan, dense_mlp_plan


def qwen3_text_plan(model: nn.Module, prefix: str = "model.language_model", lm_head: str = "lm_head") -> dict:
    layers = f"{prefix}.layers.*"
    plan = {f"{prefix}.embed_tokens": "embedding", **decoder_attention_plan(layers),
            f"{layers}.self_attn.q_norm": "head_norm", f"{layers}.self_attn.k_norm": "head_norm"}
    for i, layer in enumerate(model.get_submodule(f"{prefix}.layers")):
        mlp = f"{prefix}.layers.{i}.mlp"
        if not hasattr(layer, "mlp"):          # a layer another pipeline stage holds (parallel/pp.py)
            continue
        if hasattr(layer.mlp, "experts"):      # sparse MoE block: replicated over TP
            plan[mlp] = "sp_gather_scatter"
        else:
            plan.update(dense_mlp_plan(mlp))
    plan[lm_head] = "lm_head"
    return plan


def vit_blocks_plan(prefix: str) -> dict:
    """Qwen3-VL-style ViT blocks: fused qkv split per head, proj rowwise, MLP fc1/fc2."""
    blocks = f"{prefix}.blocks.*"
    return {
        f"{blocks}.attn": "heads:num_heads",
        f"{blocks}.attn.qkv": "colwise_qkv",
        f"{blocks}.attn.proj": "rowwise",
        f"{blocks}.mlp.linear_fc1": "colwise",
        f"{blocks}.mlp.linear_fc2": "rowwise",
    }


def vision_plan(model: nn.Module, prefix: str = "model.visual") -> dict:
    plan = {**vit_blocks_plan(prefix),
            f"{prefix}.merger.linear_fc1": "colwise",
            f"{prefix}.merger.linear_fc2": "rowwise"}
    if len(getattr(model.get_submodule(prefix), "deepstack_merger_list", ())):
        plan.update({f"{prefix}.deepstack_merger_list.*.linear_fc1": "colwise",
                     f"{prefix}.deepstack_merger_list.*.linear_fc2": "rowwise"})
    return plan


def tp_plan(model: nn.Module) -> dict:
    return {**vision_plan(model), **qwen3_text_plan(model)}
