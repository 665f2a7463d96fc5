"""Attention implementation per model.json module (``attn_implementation``: eager | sdpa |
flash_attention_2), set through transformers' own switch on the sub-model(s) of that module: each
outermost ``PreTrainedModel`` under the module's paths gets ``set_attn_implementation`` (which sets
its sub-config, e.g. vision_config / text_config, and transformers dispatches on it)."""
from __future__ import annotations

from torch import nn


def flash_attn_available() -> bool:
    from transformers.utils import is_flash_attn_2_available
    return bool(is_flash_attn_2_available())


def submodels(roots: list[nn.Module]) -> list[nn.Module]:
    """Outermost transformers PreTrainedModel modules under ``roots`` (a root may be one)."""
    from transformers import PreTrainedModel

    found: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        if isinstance(m, PreTrainedModel):
            found.append(m)
            return
        for c in m.children():
            walk(c)

    for r in roots:
        walk(r)
    return found


def set_attn_implementation(roots: list[nn.Module], impl: str) -> list[nn.Module]:
    """Set ``impl`` on every sub-model under ``roots``; returns them (empty: nothing with attention)."""
    subs = submodels(roots)
    for m in subs:
        m.set_attn_implementation(impl)
    return subs
