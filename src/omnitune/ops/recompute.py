"""Activation recompute (checkpointing) and activation offload of a module's layers.

Both patch the *instance* ``forward`` of each chosen layer, so parameter names, state dicts and the
FSDP2 units stay exactly as without them, and FSDP2's hooks (on ``__call__``) stay outside the
checkpointed region: the layer's parameters are gathered by FSDP's pre-backward hook before the
recompute runs (torchtitan's order: checkpoint inside fully_shard). Apply before ``fully_shard``.

model.json semantics (Megatron's):
- recompute_granularity "full": recompute whole layers; "selective" (core attention only) is not
  implemented and refused by the config check.
- recompute_method "uniform": every layer is recomputed (Megatron groups ``recompute_num_layers``
  layers per checkpoint; transformers calls its layers one by one, so here each layer is its own
  checkpoint: same numerics, the saved inputs are one per layer);
  "block": only the first ``recompute_num_layers`` layers are recomputed.
- activation_offload: with recompute, the checkpoints' inputs (the hidden states entering each
  recomputed layer) are kept in host memory and copied back for the recompute (MindSpeed's
  semantics); layers that are not recomputed send every tensor they save for backward to host
  memory (pinned when the device is CUDA/NPU). Parameters are never copied (FSDP re-gathers them).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def layers_to_recompute(layers: list[nn.Module], method: str | None, num_layers: int | None) -> list[nn.Module]:
    if method in (None, "uniform"):
        return list(layers)
    if method == "block":
        n = len(layers) if num_layers is None else num_layers
        return list(layers[:max(n, 0)])
    raise ValueError(f"recompute_method {method!r}: one of uniform, block")


def _count(stats: dict | None, t: torch.Tensor) -> None:
    """Record one tensor moved to host memory (tests read ``stats`` to see the path is taken)."""
    if stats is not None:
        stats["packed"] = stats.get("packed", 0) + 1
        stats["bytes"] = stats.get("bytes", 0) + t.numel() * t.element_size()


def _patch_forward(layer: nn.Module, flag: str, training_forward) -> None:
    """``layer.forward`` becomes ``training_forward(inner, *args, **kwargs)`` while grad is enabled
    (the instance attribute, once per layer: ``flag`` marks a patched layer)."""
    if getattr(layer, flag, False):
        return
    inner = layer.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return training_forward(inner, *args, **kwargs)

    layer.forward = forward
    setattr(layer, flag, True)


def _to_host(t, stats: dict | None):
    """Differentiable copy of an activation to host memory (no-op for host tensors unless forced)."""
    if not (torch.is_tensor(t) and t.is_floating_point()):
        return t
    if t.device.type == "cpu" and not (stats or {}).get("force", False):
        return t
    _count(stats, t)
    return t.to("cpu", copy=True)


def checkpoint_layer(layer: nn.Module, offload_inputs: bool = False, stats: dict | None = None) -> None:
    """Recompute ``layer``'s forward in backward instead of keeping its activations. With
    ``offload_inputs`` the checkpoint's saved inputs (the positional activations, e.g. the hidden
    states entering the layer) are kept in host memory and copied back for the recompute."""
    def forward(inner, *args, **kwargs):
        if not offload_inputs:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        devices = [a.device if torch.is_tensor(a) else None for a in args]
        host = [_to_host(a, stats) for a in args]

        def run(*h):
            back = [x.to(d) if d is not None and torch.is_tensor(x) and x.device != d else x
                    for x, d in zip(h, devices)]
            return inner(*back, **kwargs)

        return checkpoint(run, *host, use_reentrant=False)

    _patch_forward(layer, "_omnitune_recompute", forward)


class offload_to_host(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks: activations (not parameters, not host tensors) move to host memory when
    autograd saves them and back to their device when backward needs them.

    ``stats`` counts what was moved (tests use it to see the path is taken)."""

    def __init__(self, stats: dict | None = None):
        self.stats = stats if stats is not None else {}

        def pack(t: torch.Tensor):
            if isinstance(t, nn.Parameter) or (t.device.type == "cpu" and not self.stats.get("force", False)):
                return t
            pin = t.device.type != "cpu"
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            _count(self.stats, t)
            return (t.device, host)

        def unpack(packed):
            if isinstance(packed, tuple):
                device, host = packed
                return host.to(device, non_blocking=True)
            return packed

        super().__init__(pack, unpack)


def offload_layer(layer: nn.Module, stats: dict | None = None) -> None:
    """Run ``layer``'s forward under :class:`offload_to_host`."""
    def forward(inner, *args, **kwargs):
        with offload_to_host(stats):
            return inner(*args, **kwargs)

    _patch_forward(layer, "_omnitune_offload", forward)


def apply_recompute_and_offload(module_layers: dict[str, list[nn.Module]], settings: dict,
                                offload_stats: dict | None = None) -> dict[str, dict[str, int]]:
    """settings: model.json module path -> ModuleConfig. Returns per module the number of layers
    recomputed / offloaded (for the plan log and tests)."""
    report = {}
    for name, mod in settings.items():
        recompute = mod.recompute_granularity == "full"
        if not recompute and not mod.activation_offload:
            continue
        layers = module_layers.get(name)
        if not layers:
            from omnitune.config.errors import ConfigError
            raise ConfigError(f"model.json {name}: recompute / activation_offload set but this model has no "
                              f"layers for {name}")
        chosen = layers_to_recompute(layers, mod.recompute_method,
                                     mod.recompute_num_layers) if recompute else []
        for layer in chosen:
            # recomputed + offloaded: the checkpoint's inputs go to the host (MindSpeed's semantics)
            checkpoint_layer(layer, offload_inputs=mod.activation_offload, stats=offload_stats)
        if mod.activation_offload:
            # layers that are not recomputed: every activation they save goes to the host
            chosen_ids = {id(x) for x in chosen}
            for layer in layers:
                if id(layer) not in chosen_ids:
                    offload_layer(layer, offload_stats)
        report[name] = {"recompute": len(chosen), "offload": len(layers) if mod.activation_offload else 0}
    return report
