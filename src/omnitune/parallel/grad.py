"""Gradient-norm clipping over parameters that live on different device meshes.

``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms, which fails (or is wrong) once the
gradients are DTensors on different meshes: FSDP2-only 1-D (dp_cp), FSDP2 x TP 2-D (dp_cp, tp),
experts on an expert mesh. Here the gradients are grouped by (mesh, placements); each group's
squared L2 norm is the sum of its local squares, made global with one reduction over the mesh
dims the group is sharded on (``DTensor.from_local(..., Partial on Shard dims, Replicate
elsewhere).full_tensor()``); the groups' squares are added (plain tensors count as replicated).
Every rank gets the same total norm and scales its local gradients by the same factor.

Collective order: the groups are visited in the order their first gradient appears in ``params``,
so every rank must pass the same parameter list (the model's parameters with a gradient, as the
trainer does; FSDP2 gives every rank the same set).
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.placement_types import _StridedShard


def _sharded(pl) -> bool:
    """Shard or _StridedShard (TP's fused qkv; FSDP2 on top of TP): the mesh dim holds disjoint parts."""
    return pl.is_shard() or isinstance(pl, _StridedShard)


def _local_sq(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


@torch.no_grad()
def total_norm(params) -> float:
    """Global L2 norm of the gradients of ``params`` (an iterable of tensors)."""
    groups: dict = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):   # not reduced yet: reduce before squaring
                g = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])
            key = (g.device_mesh, tuple(g.placements))
            groups.setdefault(key, []).append(g.to_local())
        else:
            groups.setdefault(None, []).append(g)
    sq = torch.zeros((), dtype=torch.float64)
    for key, grads in groups.items():
        local = _local_sq(grads).double()
        if key is not None:
            mesh, placements = key
            red = [Partial("sum") if _sharded(pl) else Replicate() for pl in placements]
            local = DTensor.from_local(local.to(grads[0].device), mesh, red, run_check=False).full_tensor()
        sq += local.cpu()
    return math.sqrt(float(sq))


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, eps: float = 1e-6) -> float:
    """Scale the gradients of ``params`` so that their global L2 norm is at most ``max_norm``
    (``inf``: measure only). Returns the norm before clipping (a Python float, same on every rank)."""
    params = [p for p in params if p.grad is not None]
    norm = total_norm(params)
    coef = max_norm / (norm + eps)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return norm
