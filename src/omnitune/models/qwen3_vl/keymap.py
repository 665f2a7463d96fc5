"""Qwen3-VL (dense and MoE): HF weight names <-> MindSpeed-MM's FSDP2 DCP checkpoint.

MindSpeed-MM trains Qwen3-VL with the HF module tree, so the DCP names are the HF names under
``model.`` (inside the "model" entry; full DCP name ``model.model.<HF name>``). The MoE experts are
stored fused in the HF folder as 3-D ``mlp.experts.gate_up_proj`` [E, H, 2I] / ``down_proj``
[E, I, H]; in the DCP they are 2-D views [E*H, 2I] / [E*I, H]. With ``tie_weight`` the DCP also
gets ``lm_head.weight`` = the embedding.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
FUSED_EXPERTS = re.compile(r".*\.mlp\.experts\.(gate_up_proj|down_proj)")
TIE = {"lm_head.weight": "model.language_model.embed_tokens.weight"}


def num_experts(config: dict) -> Optional[int]:
    text = config.get("text_config") or config
    return text.get("num_experts") or text.get("num_local_experts")  # transformers 4.x / 5 spelling


def hf_to_dcp(sd: dict, tie_weight: bool) -> dict:
    """One group of HF tensors -> names/values inside the DCP "model" entry (without its prefix)."""
    out = {}
    for k, v in sd.items():
        if FUSED_EXPERTS.fullmatch(k) and v.dim() == 3:
            v = v.reshape(-1, v.shape[-1])
        out[k] = v
        if tie_weight:
            for tgt, src in TIE.items():
                if k == src:
                    out[tgt] = v
    return out


def dcp_to_hf(sd: dict, experts: Optional[int]) -> dict:
    out = {}
    for k, v in sd.items():
        if experts and FUSED_EXPERTS.fullmatch(k) and v.dim() == 2:
            v = v.reshape(experts, -1, v.shape[-1])
        out[k] = v
    return out


def dcp_to_model(name: str, t: torch.Tensor, experts: Optional[int],
                 model_shapes: dict) -> Optional[tuple[str, torch.Tensor]]:
    """A DCP entry (HF folder name) -> (transformers-5 module name, tensor) for ``--load``: the module
    tree is the HF one. Fused experts are [E, H, 2I] / [E, I, H] in hub folders but [E, 2I, H] /
    [E, H, I] in the transformers 5 module (folders it saves itself hold its own layout); as
    transformers' own loader does, they are transposed only when the shape differs from the module's."""
    if FUSED_EXPERTS.fullmatch(name):
        t = dcp_to_hf({name: t}, experts)[name]
        want = model_shapes.get(name)
        if t.dim() == 3 and want is not None and tuple(t.shape) != tuple(want):
            t = t.transpose(1, 2)
    return name, t
