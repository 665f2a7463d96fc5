"""FSDP2: one ``fully_shard`` per vision block and decoder layer (the family lists them), then
the root. bf16 compute keeps fp32 master weights (the sharded parameters) and fp32 gradient
reduction; without --bf16 everything stays fp32."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, units: list[nn.Module], mesh, bf16: bool) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
