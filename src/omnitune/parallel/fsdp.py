"""FSDP2: one ``fully_shard`` per vision block and decoder layer (the family lists them), then
the root. bf16 compute keeps fp32 master weights (the sharded parameters) and fp32 gradient
reduction; without --bf16 everything stays fp32.

With expert parallelism (``dims.ep > 1``, experts split by parallel/ep.py ``apply_ep``) every
EP-sharded experts module is first wrapped on its own, on ``dims.ep_mesh["dp_cp_mod_ep"]`` (the
ranks holding the same experts; its DTensor weights already live on ``ep_mesh["ep"]``, same root
mesh). An expert's gradient sums the contributions of the tokens of all ``dp_cp`` ranks (each ep
rank's tokens reach it through the all-to-all, the ``dp_cp / ep`` FSDP ranks add theirs in the
reduce-scatter), so its divide factor is ``dp_cp`` -- the same mean over data-parallel ranks
every other parameter gets -- not FSDP's default group size ``dp_cp / ep``.

The --hetero-parallel encoders (``towers``, parallel/hetero.py) are sharded the same way over
``dims.mesh["dp_cp_tp"]``: each TP rank encoded other items, so their gradients are summed over TP
and averaged over ``dp_cp``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, units: list[nn.Module], mesh, bf16: bool, dims=None,
               towers: list[nn.Module] = ()) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None)
    if dims is not None and dims.ep > 1:
        from omnitune.parallel.ep import ep_experts_modules

        ep_fsdp = dims.ep_mesh["dp_cp_mod_ep"]
        for experts in ep_experts_modules(model):
            fully_shard(experts, mesh=ep_fsdp, mp_policy=mp)
            experts.set_gradient_divide_factor(float(dims.dp_cp))
            # a custom factor is a PREMUL_SUM reduce-scatter, which gloo / hccl lack: sum, then
            # divide. Not on a 1-rank group: torch 2.14 divides twice there (copy / factor, then
            # the post-divide)
            if ep_fsdp.size() > 1:
                experts.set_force_sum_reduction_for_comms(True)
    inside = {id(m) for t in towers for m in t.modules()}
    if towers:   # --hetero-parallel encoders: their units, then the tower, on dp x cp x tp
        flat = dims.mesh["dp_cp_tp"]
        for t in towers:
            for unit in [u for u in units if any(u is m for m in t.modules())] + [t]:
                fully_shard(unit, mesh=flat, mp_policy=mp)
                unit.set_gradient_divide_factor(float(dims.dp_cp))
                unit.set_force_sum_reduction_for_comms(True)   # (flat mesh >= TP >= 2 ranks)
    for unit in units:
        if id(unit) in inside:
            continue
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model

