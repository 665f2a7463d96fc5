"""``--load <mm folder>``: initialise the trainer's model from a MindSpeed-MM ("mm") checkpoint.

The folder may use any TP / PP / VPP layout (hetero vision/audio TP too): the layout is read from
the folder itself (rank folder names, ``model0..`` chunks, layer indices, shard shapes), then the
weights are merged in memory one layer at a time with the same family keymap and layout code as
``mm-convert`` and copied into the model's parameters. Nothing is written.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from omnitune.convert import engine as E
from omnitune.config.errors import ConfigError
from omnitune.convert import layout as L


def is_mm_checkpoint(path: str | Path) -> bool:
    """``latest_checkpointed_iteration.txt`` + the iteration folder it names (or any ``release`` /
    ``iter_*``) holding ``mp_rank_*`` folders."""
    root = Path(path)
    latest = root / L.LATEST_TXT
    if not latest.is_file():
        return False
    text = latest.read_text(errors="replace").strip()
    cands = [root / ("release" if text == "release" else f"iter_{int(text):07d}")] if text.isdigit() or \
        text == "release" else []
    cands += [root / "release", *sorted(root.glob("iter_*"))]
    return any(d.is_dir() and any(p.is_dir() and p.name.startswith("mp_rank_") for p in d.iterdir()) for d in cands)


def is_dcp_release(path: str | Path) -> bool:
    """A MindSpeed-MM FSDP2 checkpoint written by ``mm-convert Qwen3VLConverter|ExpertMergeDcpConverter
    hf_to_dcp``: the iteration folder is DCP but has no omnitune trainer_state.json."""
    root = Path(path)
    latest = root / L.LATEST_TXT
    if not latest.is_file():
        return False
    text = latest.read_text(errors="replace").strip()
    if not (text == "release" or text.isdigit()):
        return False
    d = root / ("release" if text == "release" else f"iter_{int(text):07d}")
    return (d / ".metadata").is_file() and not (d / "trainer_state.json").is_file()


def keymap_for(family) -> ModuleType:
    """The keymap module next to the family's spec (``omnitune.models.<family>.keymap``)."""
    pkg = type(family).__module__.rsplit(".", 1)[0]
    try:
        module = importlib.import_module(pkg + ".keymap")
    except ModuleNotFoundError as e:
        raise ConfigError(f"--load of an mm checkpoint: model family {family.name!r} has no keymap "
                         f"({pkg}.keymap); load an HF folder instead") from e
    return getattr(module, "KEYMAP", module)


def _to_model_key(km: ModuleType):
    return getattr(km, "hf_key_to_model_key", None) or km.denormalize_hf_key


def load_mm_weights(mm_dir: str | Path, family, model: nn.Module) -> L.ParallelConfig:
    """Copy the weights of the mm folder into ``model`` (an HF model of ``family``). Returns the
    layout found. Every parameter and persistent buffer of the model must be covered."""
    try:
        if is_dcp_release(mm_dir):
            return _load_dcp(mm_dir, family, model)
        return _load(mm_dir, family, model)
    except L.ConvertError as e:
        raise ConfigError(str(e)) from e


def _load(mm_dir, family, model: nn.Module) -> L.ParallelConfig:
    km = keymap_for(family)
    sizes = km.Sizes.from_config(model.config.to_dict())
    mods = km.modules(sizes)
    params = model.state_dict()
    to_model = _to_model_key(km)
    model_meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in params.items()}
    to_hf = getattr(km, "model_keys_to_hf", None)
    hf_meta = to_hf(model_meta) if to_hf else km.normalize_hf_keys(model_meta)[0]
    full_meta = km.hf_to_mm(hf_meta, sizes, 1)
    par = E.detect_layout(mm_dir, mods, km, sizes, full_meta)
    try:
        L.validate_layout(par, mods, field_prefix=f"--load {mm_dir}", divisible=km.tp_divisibility(sizes))
    except L.ConvertError as e:
        raise ConfigError(f"{e} (layout read from the folder; does it belong to this model's config.json?)") from e
    source = E.MmSource(mm_dir, par, mods, km, "--load")
    loaded: set[str] = set()
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(
        family.text_config(model.config), "tie_word_embeddings", False)
    try:
        with torch.no_grad():
            for hf in E.iter_hf_groups(source, km, sizes):
                for k, t in hf.items():
                    mk = to_model(k)
                    if mk not in params:
                        raise ConfigError(f"--load {mm_dir}: weight {k!r} has no place in the "
                                         f"{type(model).__name__} ({mk!r})")
                    if tuple(params[mk].shape) != tuple(t.shape):
                        raise ConfigError(f"--load {mm_dir}: {k!r} is {tuple(t.shape)}, the model's {mk!r} is "
                                         f"{tuple(params[mk].shape)}; does the checkpoint belong to this config.json?")
                    params[mk].copy_(t)
                    loaded.add(mk)
    finally:
        source.close()
    missing = [k for k in params if k not in loaded and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ConfigError(f"--load {mm_dir}: the checkpoint does not hold {len(missing)} weights of the model "
                         f"(e.g. {missing[:3]})")
    return par


def _load_dcp(dcp_root, family, model: nn.Module):
    """Weights of a MindSpeed-MM DCP (``model.model.<HF name>``) into the model, one tensor at a time,
    through the family keymap's ``dcp_to_model``."""
    from omnitune.convert.dcp import DcpSource

    pkg = type(family).__module__.rsplit(".", 1)[0]
    module = importlib.import_module(pkg + ".keymap")
    fn = getattr(module, "dcp_to_model", None)
    if fn is None:
        raise ConfigError(f"--load {dcp_root}: a DCP checkpoint of family {family.name!r} cannot be read "
                          f"({pkg}.keymap has no dcp_to_model); load an HF or mm folder instead")
    params = model.state_dict()
    text = family.text_config(model.config)
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    src = DcpSource(dcp_root, "--load")
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    loaded = set()
    with torch.no_grad():
        for name in src.names:
            hit = fn(name, src.meta(name), experts, shapes)
            if hit is None:
                continue
            key = hit[0]
            if key not in params:
                raise ConfigError(f"--load {dcp_root}: DCP entry {name!r} has no place in the "
                                  f"{type(model).__name__} ({key!r})")
            _, t = fn(name, src.read(name), experts, shapes)
            if tuple(t.shape) != tuple(params[key].shape):
                raise ConfigError(f"--load {dcp_root}: {name!r} is {tuple(t.shape)}, the model's {key!r} is "
                                  f"{tuple(params[key].shape)}; does the checkpoint belong to this config.json?")
            params[key].copy_(t)
            loaded.add(key)
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    missing = [k for k in params if k not in loaded and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ConfigError(f"--load {dcp_root}: the checkpoint does not hold {len(missing)} weights of the model "
                          f"(e.g. {missing[:3]})")
    return None
