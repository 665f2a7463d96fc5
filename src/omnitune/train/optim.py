"""AdamW over trainable parameters and the Megatron-style LR schedule (linear warmup, then
cosine/linear decay to --min-lr at --train-iters, or constant)."""
from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, allow_empty: bool) -> torch.optim.Optimizer | None:
    """AdamW; biases and norm weights (1-D) get no weight decay, as in Megatron.
    Returns None when nothing is trainable and --enable-dummy-optimizer allows it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        if allow_empty:
            return None
        raise ValueError("every parameter is frozen (model.json freeze flags): nothing to train. "
                         "Unfreeze a module or pass --enable-dummy-optimizer.")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(it: int, *, lr: float, min_lr: float, warmup: int, total: int, style: str) -> float:
    """Learning rate for iteration ``it`` (0-based: the step about to be taken)."""
    if warmup > 0 and it < warmup:
        return lr * (it + 1) / warmup
    if style == "constant":
        return lr
    span = max(total - warmup, 1)
    frac = min(max(it - warmup, 0) / span, 1.0)
    if style == "linear":
        coeff = 1.0 - frac
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
    return min_lr + (lr - min_lr) * coeff


def set_lr(optimizer: torch.optim.Optimizer | None, value: float) -> None:
    if optimizer is not None:
        for g in optimizer.param_groups:
            g["lr"] = value
