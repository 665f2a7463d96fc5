"""AdamW over trainable parameters and the Megatron-style LR schedule (linear warmup, then
cosine/linear decay to --min-lr at --train-iters, or constant)."""
from __future__ import annotations

import math

import torch
from torch import nn

from omnitune.config.errors import ConfigError


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
        raise ConfigError("every parameter is frozen (model.json freeze flags): nothing to train. "
                         "Unfreeze a module or pass --enable-dummy-optimizer.")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    init_state(opt)
    return opt


def init_state(opt: torch.optim.AdamW) -> None:
    """Give every parameter its AdamW state now, exactly as AdamW makes it at the parameter's first
    gradient (step 0 on the host, zero moments shaped - and sharded - like the parameter).

    AdamW creates state lazily, so a trainable weight that no step has reached yet (an encoder the
    data has not used so far) would have none: the checkpoint would lack its keys and resuming from
    it would fail ("Missing key in checkpoint state_dict"). The updates are unchanged: AdamW skips a
    parameter without a gradient whether or not its state exists. Call after ``fully_shard``."""
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            state["step"] = torch.tensor(0.0, dtype=step_dtype, device="cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


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


class OptimizerList:
    """The AdamW of each pipeline stage model of this rank (parallel/pp.py) used as one optimizer:
    checkpoints keep one per stage (``optimizers``, None where a stage has nothing to train)."""

    def __init__(self, optimizers: list):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers if o is not None for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            if o is not None:
                o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            if o is not None:
                o.zero_grad(set_to_none=set_to_none)
