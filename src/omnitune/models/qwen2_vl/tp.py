"""Qwen2-VL tensor-parallel plan (module path pattern -> style, see omnitune.parallel.tp).

The Qwen2 text decoder part (:func:`qwen2_text_plan`) is shared by Qwen2.5-VL and Qwen2.5-Omni.
"""
from __future__ import annotations

from torch import nn


def decoder_attention_plan(layers: str) -> dict:
    """The attention half of a Qwen decoder layer (``layers``: the layers' path pattern): q/k/v
    colwise, o rowwise; the sequence-parallel entries (sp_*) only act with ``sequence_parallel``."""
    return {
        layers: "sp_layer",
        f"{layers}.input_layernorm": "sp_norm",
        f"{layers}.post_attention_layernorm": "sp_norm",
        f"{layers}.self_attn": "sp_gather",
        f"{layers}.self_attn.q_proj": "colwise",
        f"{layers}.self_attn.k_proj": "colwise",
        f"{layers}.self_attn.v_proj": "colwise",
        f"{layers}.self_attn.o_proj": "rowwise_seq",
    }


def dense_mlp_plan(mlp: str) -> dict:
    """A dense SwiGLU MLP: gate/up colwise, down rowwise."""
    return {mlp: "sp_gather", f"{mlp}.gate_proj": "colwise", f"{mlp}.up_proj": "colwise",
            f"{mlp}.down_proj": "rowwise_seq"}


def qwen2_text_plan(model: nn.Module, prefix: str = "model.language_model", lm_head: str = "lm_head") -> dict:
    """Vocab-parallel embedding and lm_head; attention and dense MLP layers split column/row-wise
    (a MoE block, if any, keeps its experts replicated: see qwen3_vl.tp)."""
    layers = f"{prefix}.layers.*"
    return {f"{prefix}.embed_tokens": "embedding", **decoder_attention_plan(layers),
            **dense_mlp_plan(f"{layers}.mlp"), lm_head: "lm_head"}


def vision_plan(model: nn.Module, prefix: str = "model.visual") -> dict:
    """Qwen2-VL ViT: fused qkv split per head, proj rowwise; MLP fc1/fc2; merger MLP."""
    blocks = f"{prefix}.blocks.*"
    return {
        f"{blocks}.attn": "heads:num_heads",
        f"{blocks}.attn.qkv": "colwise_qkv",
        f"{blocks}.attn.proj": "rowwise",
        f"{blocks}.mlp.fc1": "colwise",
        f"{blocks}.mlp.fc2": "rowwise",
        f"{prefix}.merger.mlp.0": "colwise",
        f"{prefix}.merger.mlp.2": "rowwise",
    }


def tp_plan(model: nn.Module) -> dict:
    return {**vision_plan(model), **qwen2_text_plan(model)}
