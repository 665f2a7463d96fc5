"""Causal-LM loss from hidden states: logits = hidden @ lm_head, cross-entropy on the next token,
labels -100 ignored. Logits are computed in fp32 as Hugging Face does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is trained to predict token t+1 (the last position has no target)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def token_losses(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sum of token losses, number of trained tokens) for one micro-batch."""
    target = shift_labels(labels)
    mask = target != IGNORE_INDEX
    h = hidden[mask]                      # only trained positions go through the vocab projection
    logits = lm_head(h).float()
    loss_sum = F.cross_entropy(logits, target[mask], reduction="sum")
    return loss_sum, mask.sum()
