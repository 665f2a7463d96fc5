"""Causal-LM loss from hidden states: logits = hidden @ lm_head, cross-entropy on the next token,
labels -100 ignored. Logits are computed in fp32 as Hugging Face does.

Loss types (docs/reference.md; model.json ``loss_cfg.loss_type`` or --calculate-per-*-loss). Each is
one weighted sum of token losses over the whole global batch, ``L = sum_i w_i * l_i``, with the
weights fixed before any backward from counts taken up front (:func:`token_weights`):

- ``default``:         w = 1 / (trained tokens of its micro-batch * micro-batches per step * DP size)
                       (token mean per micro-batch, then mean over grad-acc and data-parallel ranks)
- ``per_sample_loss``: w = 1 / (trained tokens of its sample * samples in the global batch)
                       (token mean per sample, then mean over the samples with >= 1 trained token)
- ``per_token_loss``:  w = 1 / (trained tokens in the global batch)

Compute modes (``loss_cfg.compute_mode``): ``default`` builds the logits of all trained positions at
once; ``chunk`` / ``dynamic_chunk`` go through :mod:`omnitune.ops.chunked_ce` so only one chunk of
logits is alive (``chunk``: chunks of ``chunk_size`` trained positions; ``dynamic_chunk``: the trained
positions of the micro-batch split into ``ceil(N / chunk_size)`` equal chunks, none above chunk_size).

Tensor parallel (parallel/tp.py): the lm_head weight is a DTensor sharded on the vocabulary; the
logits then stay sharded and :mod:`omnitune.ops.vocab_parallel` computes the cross-entropy (every
compute mode; chunk modes keep one chunk of local logits alive).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_TYPES = ("default", "per_sample_loss", "per_token_loss")
COMPUTE_MODES = ("default", "chunk", "dynamic_chunk")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is trained to predict token t+1 (the last position has no target)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def trained_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: positions whose next token is trained."""
    return shift_labels(labels) != IGNORE_INDEX


def chunk_rows(n: int, compute_mode: str, chunk_size: int | None) -> int | None:
    """Rows per chunk for ``n`` trained positions, or None for the unchunked path."""
    if compute_mode == "default":
        return None
    if not chunk_size or chunk_size < 1:
        raise ValueError(f"loss_cfg.compute_mode {compute_mode!r} needs loss_cfg.chunk_size >= 1")
    if compute_mode == "chunk":
        return chunk_size
    if compute_mode == "dynamic_chunk":
        if n == 0:
            return chunk_size
        return math.ceil(n / math.ceil(n / chunk_size))
    raise ValueError(f"unknown loss_cfg.compute_mode {compute_mode!r}; one of {COMPUTE_MODES}")


def _per_token(h: torch.Tensor, lm_head: torch.nn.Linear, t: torch.Tensor, compute_mode: str,
               chunk_size: int | None) -> torch.Tensor:
    """Cross-entropy of each trained position (rows of ``h``, targets ``t``), fp32 logits."""
    rows = chunk_rows(h.shape[0], compute_mode, chunk_size)
    from omnitune.ops.vocab_parallel import is_vocab_sharded
    if is_vocab_sharded(lm_head.weight):   # tensor parallel: logits stay sharded on the vocabulary
        from omnitune.ops.vocab_parallel import vocab_parallel_linear_cross_entropy
        return vocab_parallel_linear_cross_entropy(h, lm_head.weight, lm_head.bias, t, rows)
    if rows is None:
        return F.cross_entropy(lm_head(h).float(), t, reduction="none")
    from omnitune.ops.chunked_ce import chunked_linear_cross_entropy
    return chunked_linear_cross_entropy(h, lm_head.weight, lm_head.bias, t, rows)


def token_losses(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                 weights: torch.Tensor | None = None, compute_mode: str = "default",
                 chunk_size: int | None = None, pre_shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sum of token losses, number of trained tokens) for one micro-batch.

    ``weights`` ([B, S], aligned with the shifted labels, see :func:`token_weights`) turns the sum
    into ``sum_i w_i * l_i``; without it every trained token has weight 1. ``pre_shifted``: ``labels``
    already are the targets of each position (context parallelism shifts on the full sequence).
    """
    target = labels if pre_shifted else shift_labels(labels)
    mask = target != IGNORE_INDEX
    # only trained positions go through the vocab projection
    per_token = _per_token(hidden[mask], lm_head, target[mask], compute_mode, chunk_size)
    if weights is None:
        loss_sum = per_token.sum()
    else:
        loss_sum = (per_token * weights[mask].to(per_token.dtype)).sum()
    return loss_sum, mask.sum()


def row_log_probs(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                  compute_mode: str = "default", chunk_size: int | None = None,
                  pre_shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log-probability of each row's trained tokens, summed [B] fp32; trained tokens per
    row [B]): what DPO (train/dpo.py) compares between policy and reference. Same logits path as
    :func:`token_losses` (chunked / vocab-parallel included)."""
    target = labels if pre_shifted else shift_labels(labels)
    mask = target != IGNORE_INDEX
    per_token = _per_token(hidden[mask], lm_head, target[mask], compute_mode, chunk_size)
    row = mask.nonzero(as_tuple=True)[0]
    logp = torch.zeros(mask.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, row, -per_token)
    return logp, mask.sum(-1)


# ------------------------------------------------------------------------------------- loss types
def sample_trained_counts(labels: torch.Tensor, segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(trained-token count of each sample, and for each position the index of its sample in that
    count vector). A sample is a row, or with packing (``segments`` [B, S], data/packing.py) one
    segment of a row; padding positions map to a slot of their own (never trained)."""
    mask = trained_mask(labels)
    if segments is None:
        return mask.sum(-1), torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    width = int(segments.max()) + 2
    slot = torch.arange(labels.shape[0], device=labels.device)[:, None] * width + segments + 1
    return torch.bincount(slot.flatten(), weights=mask.flatten().double(), minlength=labels.shape[0] * width), slot


def local_counts(labels_list: list[torch.Tensor], segments_list: list | None = None) -> torch.Tensor:
    """[trained tokens, samples with >= 1 trained token] over this rank's micro-batches (float64).
    With packing, ``segments_list`` holds each micro-batch's ``segment_ids``: samples are counted
    inside the rows."""
    tokens = samples = 0
    for k, labels in enumerate(labels_list):
        per_sample, _ = sample_trained_counts(labels, segments_list[k] if segments_list else None)
        tokens += int(per_sample.sum())
        samples += int((per_sample > 0).sum())
    return torch.tensor([tokens, samples], dtype=torch.float64)


def token_weights(labels: torch.Tensor, loss_type: str, *, micro_batches: int,
                  global_tokens: float, global_samples: float, segments: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] fp32 weights of one micro-batch's token losses so that the sum of ``w_i * l_i`` over
    every micro-batch of every rank is the global-batch loss of ``loss_type``.

    micro_batches: micro-batches in the global batch (grad-acc x DP);
    global_tokens / global_samples: trained tokens / samples with a trained token in the global batch;
    segments: packed rows' ``segment_ids`` (per_sample_loss then averages inside each packed sample).
    """
    mask = trained_mask(labels).to(torch.float64)
    if loss_type == "default":
        w = mask / (mask.sum().clamp(min=1) * micro_batches)
    elif loss_type == "per_sample_loss":
        per_sample, slot = sample_trained_counts(labels, segments)
        w = mask / (per_sample.to(torch.float64)[slot].clamp(min=1) * max(global_samples, 1.0))
    elif loss_type == "per_token_loss":
        w = mask / max(global_tokens, 1.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {LOSS_TYPES}")
    return w.to(torch.float32)
