"""Per-rank memory estimate of parameters + gradients + optimizer state for a layout (``--dry-run``).

The model is built on the meta device from config.json (no weights read, no memory used), the
model.json freeze flags are applied, and every parameter is divided as the layout divides it:

- TP-sharded parameters (the family's TP plan) by ``tp``;
- then FSDP2 shards everything over DP x CP (--hetero-parallel's data-parallel encoders: not TP-split,
  sharded over DP x CP x TP). MoE experts under EP: E/EP experts per rank, each
  FSDP-sharded over DP x CP / EP, which is the same share (EP trades all-gathers for all-to-alls).

Bytes: fp32 master weights (4 per element), fp32 gradients and AdamW's two fp32 moments (4 + 8) for
trainable ones. Activations depend on the data and are not included; the largest FSDP unit is
gathered whole during its forward/backward (its bf16 or fp32 copy is shown as "transient").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Estimate:
    params: int          # elements held by this rank
    trainable: int       # of which trainable
    total_params: int    # whole model
    bytes_params: int
    bytes_grads: int
    bytes_optim: int
    bytes_transient: int  # largest FSDP unit gathered (compute dtype)

    @property
    def bytes_total(self) -> int:
        return self.bytes_params + self.bytes_grads + self.bytes_optim


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def meta_model(family, hf_config):
    with torch.device("meta"):
        return family.model_class()._from_config(family.trainable_config(hf_config), dtype=torch.float32)


def _tp_sharded_names(model, family) -> set[str]:
    """Parameter names the family's TP plan splits over the TP ranks."""
    from omnitune.parallel.tp import tp_sharded_parameter_names
    return set(tp_sharded_parameter_names(model, family))


def estimate_rank_bytes(family, hf_config, dims, frozen: set[str], bf16: bool = False, stages=None) -> Estimate:
    """``stages`` (PP > 1, parallel.pp.StageSpec list): the PP rank holding the most, counting the
    parameters of its stages (the tied embedding / lm_head on both the first and the last)."""
    if stages is not None:
        return max((_estimate(family, hf_config, dims, frozen, bf16, [s for s in stages if s.index % dims.pp == r])
                    for r in range(dims.pp)), key=lambda e: e.bytes_total)
    return _estimate(family, hf_config, dims, frozen, bf16, None)


def _estimate(family, hf_config, dims, frozen: set[str], bf16: bool, stages) -> Estimate:
    import copy

    from omnitune.train.model import apply_freeze

    model = meta_model(family, hf_config)
    for p in family.unused_parameters(model):
        p.requires_grad_(False)
    apply_freeze(model, family, frozen)
    tp_names = _tp_sharded_names(model, family) if dims.tp > 1 else set()
    hetero = set()   # --hetero-parallel encoders: whole (no TP), FSDP over DP x CP x TP
    if getattr(dims, "hetero_dp", ()):
        from omnitune.parallel.hetero import tower_paths
        paths = tuple(tower_paths(model, family, dims).values())
        hetero = {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in paths)}
        tp_names -= hetero
    keep = None
    if stages is not None:
        from omnitune.parallel.pp import prune_for_stage
        keep = set()
        for spec in stages:
            keep |= {n for n, _ in prune_for_stage(copy.deepcopy(model), family, spec).named_parameters(
                remove_duplicate=False)}
    held = trainable = total = 0
    by_name = {}
    for name, p in model.named_parameters(remove_duplicate=keep is None):
        if keep is not None and name not in keep:
            continue
        # experts under EP: E/ep experts per rank, FSDP over DP x CP / EP: the same share as the rest
        local = -(-p.numel() // dims.tp) if name in tp_names else p.numel()
        by_name[name] = local
        n = -(-local // (dims.dp_cp * (dims.tp if name in hetero else 1)))
        total += p.numel()
        held += n
        trainable += n if p.requires_grad else 0
    # largest FSDP unit gathered whole (its TP shard) during compute
    unit = 0
    for u in family.fsdp_units(model):
        ids = {id(p) for p in u.parameters()}
        unit = max(unit, sum(by_name.get(n, 0) for n, p in model.named_parameters() if id(p) in ids))
    return Estimate(held, trainable, total, 4 * held, 4 * trainable, 8 * trainable, unit * (2 if bf16 else 4))


def format_estimate(e: Estimate) -> list[str]:
    return [f"memory     : per rank {_gib(e.bytes_total)} = params {_gib(e.bytes_params)} + grads "
            f"{_gib(e.bytes_grads)} + AdamW {_gib(e.bytes_optim)} ({e.params / 1e6:.1f}M of "
            f"{e.total_params / 1e6:.1f}M parameters, {e.trainable / 1e6:.1f}M trainable); transient "
            f"{_gib(e.bytes_transient)} (largest FSDP unit gathered); activations not included"]
