"""Ulysses context parallelism: an attention function for transformers' attention interface.

Each rank of a context-parallel group holds one chunk of the sequence with all heads. The
function registered as ``"ulysses"`` swaps that for all positions of ``heads / cp`` heads
(all-to-all), runs the module's own implementation (eager or sdpa, recorded in the context) on the
full sequence with the full padding + causal mask, and swaps back (all-to-all)::

    q, k, v [B, H, S/cp, D] --a2a--> [B, H/cp, S, D] --inner attention--> [B, S, H/cp, D] --a2a--> [B, S/cp, H, D]

Rotary embeddings are applied before the first all-to-all (each rank rotates its own positions),
so the inner attention sees exactly the tensors a one-process run would, split by heads.

GQA: key/value heads are split like the query heads when cp divides them; with fewer kv heads than
cp ranks they are first repeated to ``cp`` heads (cp must then be a multiple of the kv heads), so
every rank holds the one kv head its query heads read.

The context (:class:`UlyssesContext`) travels as a keyword argument through the decoder's layers
(transformers passes unknown kwargs down to the attention function), so activation recompute in
backward sees the same context as the forward. It is made per forward by parallel/cp.py.

The decoder's own mask construction is skipped: ``"ulysses"`` is not registered as a mask
function, so ``create_causal_mask`` returns None whatever the local length; the full mask is
built here, once per forward, from the stashed full-length 2-D padding mask, with the inner
implementation's mask function (the same call ``create_causal_mask`` makes without a cache).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch.distributed._functional_collectives import all_to_all_single_autograd

NAME = "ulysses"
CTX_KWARG = "ulysses_ctx"
INNER_IMPLS = ("eager", "sdpa")


@dataclass
class UlyssesContext:
    """What the attention function needs beyond q/k/v for one forward of the decoder."""
    group: object                     # the cp ProcessGroup
    size: int                         # cp ranks
    inner: str                        # the decoder's own implementation: "eager" | "sdpa"
    padding_mask: torch.Tensor | None  # [B, S_padded] bool, full length (None: no padding at all)
    mask_dtype: torch.dtype = torch.float32   # dtype of the hidden states (eager's additive mask)
    _masks: dict = field(default_factory=dict, repr=False)

    def full_mask(self, module, q: torch.Tensor):
        """The full-sequence causal + padding mask of the inner implementation (cached)."""
        key = (q.shape[0], q.shape[2], q.device)
        if key not in self._masks:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

            pm = self.padding_mask
            self._masks[key] = ALL_MASK_ATTENTION_FUNCTIONS[self.inner](
                batch_size=q.shape[0], q_length=q.shape[2], kv_length=q.shape[2], q_offset=0, kv_offset=0,
                mask_function=causal_mask_function,
                attention_mask=None if pm is None else pm.to(device=q.device, dtype=torch.bool),
                allow_is_causal_skip=True, dtype=self.mask_dtype, config=module.config, use_vmap=False,
                device=q.device)
        return self._masks[key]


class _GroupsView:
    """The attention module as the inner function sees it, with the per-rank query heads per kv head
    (differs from the module's own when kv heads were repeated to cp)."""

    def __init__(self, module, groups: int):
        self._module = module
        self.num_key_value_groups = groups

    def __getattr__(self, name):
        return getattr(self._module, name)


def seq_to_heads(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[B, H, s, D] (local chunk, all heads) -> [B, H/cp, cp*s, D] (all positions, this rank's heads)."""
    b, h, s, d = x.shape
    x = x.reshape(b, cp, h // cp, s, d).transpose(0, 1).contiguous()        # [cp, B, H/cp, s, D]
    y = all_to_all_single_autograd(x.flatten(0, 1), None, None, group)        # chunk j <- rank j's positions
    return y.view(cp, b, h // cp, s, d).permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d)


def heads_to_seq(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[B, S, h, D] (all positions, this rank's heads) -> [B, S/cp, cp*h, D] (local chunk, all heads)."""
    b, sp, h, d = x.shape
    s = sp // cp
    x = x.reshape(b, cp, s, h, d).transpose(0, 1).contiguous()               # [cp, B, s, h, D]
    y = all_to_all_single_autograd(x.flatten(0, 1), None, None, group)        # chunk j <- rank j's heads
    return y.view(cp, b, s, h, d).permute(1, 2, 0, 3, 4).reshape(b, s, cp * h, d)


def inner_function(module, impl: str):
    if impl == "eager":   # transformers keeps eager per modeling file, not in ALL_ATTENTION_FUNCTIONS
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[impl]


def ulysses_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers attention-interface signature; q/k/v [B, heads, S_local, D]; returns
    ([B, S_local, heads, D], None) like the inner implementations (no attention weights)."""
    ctx: UlyssesContext | None = kwargs.pop(CTX_KWARG, None)
    if ctx is None:
        raise RuntimeError("attention 'ulysses' called without a context: the decoder must run under "
                           "omnitune.parallel.cp.apply_cp's pre-hook")
    cp, hq, hkv = ctx.size, query.shape[1], key.shape[1]
    if hq % cp:
        raise ValueError(f"Ulysses: {hq} query heads (per tensor-parallel rank) are not divisible by "
                         f"context-parallel size {cp}")
    if hkv % cp:
        if cp % hkv:
            raise ValueError(f"Ulysses: {hkv} key/value heads can be neither split over nor repeated across "
                             f"{cp} context-parallel ranks")
        key = key.repeat_interleave(cp // hkv, dim=1)
        value = value.repeat_interleave(cp // hkv, dim=1)
    q, k, v = (seq_to_heads(t, ctx.group, cp) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    inner_module = module if groups == getattr(module, "num_key_value_groups", 1) else _GroupsView(module, groups)
    kwargs.pop("position_ids", None)   # local text positions (packing / FA only): not the full sequence's
    out, _ = inner_function(module, ctx.inner)(inner_module, q, k, v, ctx.full_mask(module, q), **kwargs)
    return heads_to_seq(out, ctx.group, cp), None


def register() -> str:
    """Register the attention function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, ulysses_attention_forward)
    return NAME
