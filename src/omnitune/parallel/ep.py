"""Expert parallelism (--expert-model-parallel-size): the experts of every MoE layer are split over
``dims.ep_mesh["ep"]`` and their tokens dispatched by all-to-all (ops/moe_ep.py).

Order in the trainer: ``TrainModel`` (picks fused / eager experts per module) -> TP -> :func:`apply_ep`
-> ``parallel.fsdp.apply_fsdp(..., dims=dims)`` (expert weights FSDP2-sharded over
``ep_mesh["dp_cp_mod_ep"]``, everything else over ``mesh["dp_cp"]``) -> optimizer; clip gradients
with ``parallel.grad.clip_grad_norm_`` (the experts' gradients live on another mesh).

The expert weights (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) become DTensors
``Shard(0)`` on the ep mesh: rank j of an ep group holds experts ``j*E/ep .. (j+1)*E/ep - 1``.
State dicts (DCP, ``full_tensor()``) therefore see the full [E, ...] tensors, whatever the layout.
"""
from __future__ import annotations

from torch import nn

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def ep_experts_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules :func:`apply_ep` has sharded under ``model``."""
    return [m for m in model.modules() if getattr(m, "_omnitune_ep", None) is not None]


def apply_ep(train_model: nn.Module, family, dims) -> list[nn.Module]:
    """Shard the experts of ``train_model`` (a TrainModel or an HF model) over ``dims.ep_mesh["ep"]``
    and switch them to the all-to-all forward. Every rank must hold the same full weights (as for
    FSDP2: each rank keeps its slice, no communication). No-op when ``dims.ep == 1``. Returns the
    experts modules sharded."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from omnitune.ops.moe import experts_modules
    from omnitune.ops.moe_ep import check_ep_layout, set_ep

    if dims.ep <= 1:
        return []
    hf = getattr(train_model, "hf", train_model)
    modules = experts_modules(hf)
    if not modules:
        raise ValueError(f"expert parallelism: {getattr(family, 'name', type(hf).__name__)} has no MoE experts")
    for m in modules:  # every check before any weight is split
        if getattr(m, "_omnitune_ep", None) is not None:
            raise ValueError("apply_ep: the experts are already split")
        check_ep_layout(m, dims.ep)
    mesh = dims.ep_mesh["ep"]
    for m in modules:
        for name in EXPERT_PARAMS:
            p = getattr(m, name)
            dt = distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None)
            m.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
    set_ep(modules, mesh.get_group(), dims.ep)
    return modules
