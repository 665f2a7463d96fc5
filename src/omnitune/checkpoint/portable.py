"""The portable form of a training checkpoint: safetensors instead of DCP files.

Written by back-ends that cannot write torch.distributed.checkpoint's files (the MindSpore
back-end, backends/mindspore/ckpt.py); resumed and exported by the PyTorch path like a DCP
checkpoint. Same save-dir layout (``latest_checkpointed_iteration.txt`` -> ``iter_XXXXXXX/``)::

    iter_XXXXXXX/model.safetensors   every model tensor once (tied aliases left out), by state-dict name
    iter_XXXXXXX/optim.safetensors   AdamW state, flat keys: state.<name>.exp_avg / exp_avg_sq / step
    iter_XXXXXXX/trainer_state.json  {"format": "portable", "iteration": ..., "consumed_samples": ...}

Tensors are whole (one-process saves); :func:`fill` copies into any layout: a DTensor target gets
its own shard (checkpoint.sharded_load.local_index), so a portable checkpoint resumes at TP / FSDP
as a DCP one does. Optimizer hyper-parameters (param_groups) are not stored: they come from the
resuming job's flags, as the learning rate does after every resume.

This module imports no torch at the top: the MindSpore back-end shares its names.
"""
from __future__ import annotations

from pathlib import Path

FORMAT = "portable"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
LATEST = "latest_checkpointed_iteration.txt"
STATE = "trainer_state.json"


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_latest(root: str | Path, error=ValueError) -> str:
    """``latest_checkpointed_iteration.txt``: an iteration number or ``release`` (``error`` naming the
    file otherwise: it is edited by hand)."""
    f = Path(root) / LATEST
    try:
        text = f.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:
        raise error(f"{f}: cannot be read ({getattr(e, 'strerror', None) or e}); write the number of "
                    f"an existing iter_* folder into it (e.g. 5 for iter_0000005)") from None
    if text != "release" and not (text.isascii() and text.isdigit()):
        raise error(f"{f}: holds {text[:40]!r}, not an iteration number; write the number of an "
                    f"existing iter_* folder into it (e.g. 5 for iter_0000005) or 'release'")
    return text


def is_portable(ckpt: str | Path) -> bool:
    return (Path(ckpt) / MODEL_FILE).is_file() and not (Path(ckpt) / ".metadata").is_file()


def fill(ckpt: str | Path, state: dict) -> None:
    """Fill ``state`` ({"model": {name: tensor}, "optim": {flat key: tensor | value}}, the dict a DCP
    load would fill) from a portable iteration folder. Every model tensor must be there (a
    CheckpointError names the missing ones); optimizer entries that are not tensors keep their
    current values."""
    import torch
    from safetensors import safe_open

    from omnitune.checkpoint.safe_dcp import CheckpointError
    from omnitune.checkpoint.sharded_load import gather, local_index

    ckpt = Path(ckpt)
    for part, fname in (("model", MODEL_FILE), ("optim", OPTIM_FILE)):
        targets = state.get(part)
        if not targets:
            continue
        f = ckpt / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the checkpoint holds no {part} state (resume with "
                                  f"--no-load-optim) or is incomplete")
        with safe_open(str(f), framework="pt") as src:
            have = set(src.keys())
            wanted = {k for k, v in targets.items() if torch.is_tensor(v)}
            missing = sorted(wanted - have)
            if missing:
                raise CheckpointError(f"{f}: lacks {len(missing)} tensor(s) this model has, e.g. {missing[:3]}; "
                                      f"it was saved from another model")
            for k in sorted(wanted):
                t = targets[k]
                full = src.get_tensor(k)
                if tuple(full.shape) != tuple(t.shape):
                    raise CheckpointError(f"{f}: {k} has shape {tuple(full.shape)}, this model's is "
                                          f"{tuple(t.shape)}; it was saved from another model size")
                idx, local = local_index(t)
                with torch.no_grad():
                    local.copy_(gather(full, idx).to(local.dtype))
