"""Vocabulary-parallel embedding and lm_head + cross-entropy for tensor parallelism.

Under TP the embedding table and the lm_head weight are DTensors sharded on dim 0 (vocabulary
rows) over the TP mesh: rank r holds rows [start, start + V/tp). Hidden states and targets are
replicated over TP (every TP rank computes the same token positions).

- :func:`vocab_parallel_embedding`: each rank looks up the ids in its rows (zeros elsewhere) and
  the results are summed over TP. Backward is local: every rank already holds the full, identical
  gradient of the output, so the weight gradient of its rows needs no communication (DTensor's own
  rowwise embedding materialises a full [V, H] replicated gradient on each rank instead).
- :func:`vocab_parallel_linear_cross_entropy`: logits stay sharded on the vocabulary; the softmax
  normaliser is assembled with one max all-reduce and one sum all-reduce (sum of exp + the target's
  logit, which lives on one rank), as Megatron's vocab-parallel cross-entropy. Backward: each rank
  forms ``softmax - onehot`` for its columns, its weight gradient is local, the hidden-state
  gradient is summed over TP. With ``chunk_size`` only one chunk of local logits is alive at a time
  (forward and backward, recomputed as in :mod:`omnitune.ops.chunked_ce`); without it the local
  softmax is kept for backward like ``F.cross_entropy`` keeps its logits.

Collectives are ``torch.distributed._functional_collectives`` on the weight's mesh group.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from omnitune.ops.chunked_ce import _autocast_state


def is_vocab_sharded(weight) -> bool:
    """True for a DTensor sharded on dim 0 over a 1-D mesh (the TP-unsharded view FSDP2 gives
    during forward, or a TP-only parameter)."""
    return (isinstance(weight, DTensor) and weight.device_mesh.ndim == 1
            and len(weight.placements) == 1 and isinstance(weight.placements[0], Shard)
            and weight.placements[0].dim == 0)


def _vocab_range(weight: DTensor) -> tuple[int, int]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return int(offset[0]), int(offset[0]) + int(shape[0])


def _all_reduce(t: torch.Tensor, op: str, group) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t, op, group))


class _SumOverTP(torch.autograd.Function):
    """Forward: all-reduce sum of per-rank partial results. Backward: identity (the incoming
    gradient is already the same full gradient on every TP rank)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.contiguous(), "sum", group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def vocab_parallel_embedding(ids: torch.Tensor, weight: DTensor, padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding(ids, full_weight, padding_idx)`` for a vocab-sharded ``weight``; returns a plain
    tensor, replicated over TP."""
    start, end = _vocab_range(weight)
    w = weight.to_local()                     # differentiable: the grad comes back as a Shard(0) DTensor
    outside = (ids < start) | (ids >= end)
    local_ids = (ids - start).masked_fill(outside, 0)
    pad = padding_idx - start if padding_idx is not None and start <= padding_idx < end else None
    out = F.embedding(local_ids, w, pad)
    out = out.masked_fill(outside.unsqueeze(-1), 0.0)
    return _SumOverTP.apply(out, weight.device_mesh.get_group())


class VocabParallelEmbedding(nn.Embedding):
    """What parallel/tp.py's ``embedding`` style turns an ``nn.Embedding`` into (class swap; the
    weight becomes a vocab-sharded DTensor): same parameters and state dict, forward through
    :func:`vocab_parallel_embedding` (reads the current weight, e.g. FSDP2's unsharded TP view)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None or self.sparse:
            raise NotImplementedError("vocab-parallel embedding: max_norm / sparse are not supported")
        return vocab_parallel_embedding(ids, self.weight, self.padding_idx)


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, start: int, group, chunk_size):
        n, v_local = hidden.shape[0], weight.shape[0]
        dev = hidden.device.type
        enabled, ac_dtype = _autocast_state(dev)
        rows = chunk_size or max(n, 1)
        keep_softmax = chunk_size is None
        t_local = target - start
        inside = (t_local >= 0) & (t_local < v_local)
        t_local = t_local.masked_fill(~inside, 0)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        probs = []
        with torch.no_grad():
            for s in range(0, n, rows):
                logits = F.linear(hidden[s:s + rows], weight, bias).float()
                m = _all_reduce(logits.max(-1).values, "max", group)
                logits -= m[:, None]
                tgt = logits.gather(1, t_local[s:s + rows, None]).squeeze(1) * inside[s:s + rows]
                e = logits.exp_()
                red = _all_reduce(torch.stack([e.sum(-1), tgt]), "sum", group)
                lse[s:s + rows] = m + red[0].log()
                losses[s:s + rows] = red[0].log() - red[1]
                if keep_softmax:
                    probs.append(e.div_(red[0][:, None]))
                del logits, e
        ctx.save_for_backward(hidden, weight, bias, t_local, inside, lse, *probs)
        ctx.meta = (group, rows, keep_softmax, (dev, enabled, ac_dtype))
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, t_local, inside, lse, *probs = ctx.saved_tensors
        group, rows, keep_softmax, (dev, enabled, ac_dtype) = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cdtype = ac_dtype if enabled else torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(cdtype)
        grad_h = torch.empty(hidden.shape, dtype=cdtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if (need_b and bias is not None) else None)
        grad_losses = grad_losses.float()
        for i, s in enumerate(range(0, hidden.shape[0], rows)):
            h = hidden[s:s + rows].to(cdtype)
            if keep_softmax:
                g = probs[i]
            else:
                logits = F.linear(h, w, None if bias is None else bias.to(cdtype)).float()
                g = logits.sub_(lse[s:s + rows, None]).exp_()
                del logits
            # d loss_i / d logits_i = softmax_i - onehot(t_i). The one-hot part (its column lives on one
            # rank) is applied apart from the long sums over the vocabulary: folded into them, the one
            # large term costs the small softmax terms their precision (d hidden off by 1e-5 x max vs 2e-7).
            gl = grad_losses[s:s + rows]
            g *= gl[:, None]
            g = g.to(cdtype)
            hit = inside[s:s + rows].nonzero().squeeze(1)
            t_hit = t_local[s:s + rows][hit]
            if need_h:
                gh = g @ w
                gh.index_add_(0, hit, -(gl[hit, None] * w[t_hit].float()).to(cdtype))
                grad_h[s:s + rows] = gh
            if need_w:
                grad_w += (g.t() @ h).float()
                grad_w.index_add_(0, t_hit, -(gl[hit, None] * h[hit].float()))
            if grad_b is not None:
                grad_b += g.float().sum(0)
                grad_b.index_add_(0, t_hit, -gl[hit])
            del g
        if need_h:   # each rank holds the part of d loss / d hidden from its vocabulary columns
            grad_h = _all_reduce(grad_h, "sum", group).to(hidden.dtype)
        return (grad_h,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, None, None, None)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: DTensor, bias, target: torch.Tensor,
                                        chunk_size: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy losses (fp32, [N]) of ``F.linear(hidden, weight, bias)`` against
    ``target`` (trained positions only, no ignored entries) with ``weight`` ([V, H] DTensor sharded
    on the vocabulary over its 1-D mesh) and ``bias`` ([V], sharded alike, or None); ``hidden``
    and ``target`` are plain tensors replicated over that mesh. ``chunk_size``: rows of logits per
    chunk (None: all at once)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    start, _ = _vocab_range(weight)
    w = weight.to_local()
    b = bias.to_local() if isinstance(bias, DTensor) else bias
    if hidden.shape[0] == 0:   # keep the weight in the graph: its (zero) gradient exists on every rank
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * (hidden.sum() + w.sum())
    return VocabParallelLinearCrossEntropy.apply(hidden, w, b, target, start, weight.device_mesh.get_group(),
                                                 None if chunk_size is None else int(chunk_size))
