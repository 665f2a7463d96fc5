"""Context parallelism (Ulysses): the text decoder runs on 1/cp of each sequence per rank.

Every rank of a cp group reads the same micro-batch and runs everything before the text decoder
on the whole sequence: embeddings, vision/audio encoders (whole images/audios), the merge of their
features into the embeddings and the mRoPE position ids (so the rope index sees all tokens). A
forward pre-hook on the family's text decoder (``family.language_model``) then

- pads the sequence to a multiple of cp (zero embeddings, padding-masked, no labels), like
  MindSpeed-MM's unaligned Ulysses, and keeps this rank's contiguous chunk of ``inputs_embeds``,
  ``position_ids`` (any leading dims, sequence last) and the family's masked-row kwargs
  (``family.cp_masked_rows``: Qwen3-VL's DeepStack ``deepstack_visual_embeds`` rows whose
  ``visual_pos_masks`` position falls in the chunk, and that mask's chunk);
- replaces ``attention_mask`` by None and hands the full padded 2-D mask to the attention function
  (ops/ulysses.py), which attends over the full sequence with heads split over cp.

The decoder returns the hidden states of the local chunk. :meth:`ContextParallel.shifted_local`
gives the matching targets: labels shifted on the FULL sequence, then chunked, so the last token of
a chunk still predicts the first token of the next one; the loss weights are chunked the same way.
Each rank's loss is then the weighted sum over its own tokens only; the cp ranks' gradients add up
through FSDP2's reduction over dp x cp (the trainer scales each rank's loss by dp x cp).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnitune.ops import ulysses
from omnitune.train.loss import IGNORE_INDEX, shift_labels


def padded_length(seq: int, cp: int) -> int:
    """The sequence length rounded up to a multiple of cp."""
    return -(-seq // cp) * cp


def pad_seq(t: torch.Tensor, length: int, dim: int, value=0) -> torch.Tensor:
    """``t`` padded with ``value`` at the end of ``dim`` to ``length``."""
    dim = dim % t.ndim
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [0, extra]
    if t.dtype == torch.bool:
        return F.pad(t.to(torch.uint8), pad, value=int(value)).bool()
    return F.pad(t, pad, value=value)


def local_chunk(t: torch.Tensor, cp: int, rank: int, dim: int, value=0) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of ``t`` along ``dim`` after padding it to a multiple of cp."""
    full = pad_seq(t, padded_length(t.shape[dim], cp), dim, value)
    return full.chunk(cp, dim=dim)[rank]


def local_masked_rows(rows: torch.Tensor, mask: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """``rows`` hold one row per True of ``mask`` [B, S] (row-major order); keep those in the chunk."""
    s = mask.shape[1]
    lo = rank * (padded_length(s, cp) // cp)
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, lo:lo + padded_length(s, cp) // cp] = True
    return rows[keep[mask.bool()].to(rows.device)]


class ContextParallel:
    """The cp group of this rank and the per-micro-batch splitting it implies."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def local(self, t: torch.Tensor, dim: int = 1, value=0) -> torch.Tensor:
        return local_chunk(t, self.size, self.rank, dim, value)

    def shifted_local(self, labels: torch.Tensor, weights: torch.Tensor | None):
        """This rank's chunk of the full-sequence shifted targets and of the loss weights ([B, S])."""
        target = self.local(shift_labels(labels), 1, IGNORE_INDEX)
        return target, None if weights is None else self.local(weights, 1, 0.0)

    # -------------------------------------------------------------------- text decoder pre-hook
    def split_decoder_inputs(self, kwargs: dict, masked_rows: dict[str, str], inner: str) -> dict:
        """The decoder's kwargs for this rank (see the module docstring)."""
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("context parallelism is for training: the text decoder got a kv cache")
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            raise ValueError("context parallelism: the text decoder must get inputs_embeds (merged with the "
                             "vision/audio features before the split)")
        b, s = emb.shape[:2]
        pos = kwargs.get("position_ids")
        if pos is None:   # no media (no mRoPE index): the decoder's own default, 0..S-1, on the full sequence
            pos = torch.arange(s, device=emb.device).expand(b, s)
        sp = padded_length(s, self.size)
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.ndim != 2):
            raise ValueError("context parallelism needs the 2-D [batch, seq] padding mask at the text decoder")
        if mask is None and sp != s:
            mask = torch.ones(b, s, dtype=torch.bool, device=emb.device)
        full_mask = None if mask is None else pad_seq(mask.bool(), sp, 1, False)
        out = dict(kwargs)
        out["inputs_embeds"] = self.local(emb, 1)
        out["position_ids"] = self.local(pos, -1)
        out["attention_mask"] = None
        for rows_key, mask_key in masked_rows.items():
            m = kwargs.get(mask_key)
            if m is None:
                continue
            rows = kwargs.get(rows_key)
            if rows is not None:
                out[rows_key] = ([local_masked_rows(r, m, self.size, self.rank) for r in rows]
                                 if isinstance(rows, (list, tuple)) else local_masked_rows(rows, m, self.size, self.rank))
            out[mask_key] = self.local(m.bool(), 1, False)
        out[ulysses.CTX_KWARG] = ulysses.UlyssesContext(self.group, self.size, inner, full_mask, emb.dtype)
        return out


def apply_cp(train_model: nn.Module, family, cp_mesh) -> ContextParallel | None:
    """Make ``train_model`` (a TrainModel, before FSDP2) context-parallel over ``cp_mesh`` (the 1-D
    "cp" mesh). Sets ``train_model.cp``; returns it, or None when the cp size is 1."""
    size = cp_mesh.size()
    if size == 1:
        return None
    lm = family.language_model(train_model.hf)
    inner = lm.config._attn_implementation
    if inner == ulysses.NAME:
        raise RuntimeError("apply_cp: context parallelism is already applied to this model")
    if inner not in ulysses.INNER_IMPLS:
        raise ValueError(f"context parallelism: text_decoder attn_implementation {inner!r} is not supported "
                         f"with Ulysses; use one of {', '.join(ulysses.INNER_IMPLS)}")
    if getattr(lm.config, "use_sliding_window", False) or "sliding_attention" in (getattr(lm.config, "layer_types", None) or ()):
        raise ValueError("context parallelism: sliding-window attention layers are not supported")
    lm.set_attn_implementation(ulysses.register())
    cp = ContextParallel(cp_mesh.get_group(), size, cp_mesh.get_local_rank())
    masked_rows = dict(family.cp_masked_rows)

    def pre_hook(module, args, kwargs):
        if args:
            raise ValueError("context parallelism: the text decoder must be called with keyword arguments")
        return args, cp.split_decoder_inputs(kwargs, masked_rows, inner)

    lm.register_forward_pre_hook(pre_hook, with_kwargs=True)
    train_model.cp = cp
    return cp
