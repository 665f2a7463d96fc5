"""Training checkpoints of the MindSpore back-end, and reading the PyTorch path's DCP checkpoints.

Both back-ends share the save-dir layout (``latest_checkpointed_iteration.txt`` -> ``iter_XXXXXXX/``
with ``trainer_state.json``). PyTorch writes the tensors with torch.distributed.checkpoint (DCP),
whose files are pickles of torch classes that only PyTorch writes; this back-end writes the
**portable** form instead (checkpoint/portable.py documents it; the PyTorch path resumes and exports
it)::

    iter_XXXXXXX/model.safetensors   every model tensor once, under the PyTorch path's names
    iter_XXXXXXX/optim.safetensors   AdamW state: state.<name>.exp_avg / exp_avg_sq / step
    iter_XXXXXXX/trainer_state.json  {"format": "portable", "backend": "mindspore", ...}

and reads either form. DCP is read without PyTorch: ``.metadata`` through an unpickler that only
builds plain records (no class of the file's choosing is called), each tensor chunk (a ``torch.save``
zip inside a ``.distcp`` file) through a second one that knows only tensors and storages (what
``torch.load(weights_only=True)`` accepts), then the chunks are assembled by their offsets.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np

from omnitune.checkpoint.portable import (FORMAT, MODEL_FILE, OPTIM_FILE, LATEST, STATE, iter_dir_name,
                                          read_latest)
from omnitune.fsutil import write_text_atomic


class CheckpointError(ValueError):
    pass


# ------------------------------------------------------------------ DCP, read without torch
class _Record:
    """A DCP metadata object (Metadata, TensorStorageMetadata, _StorageInfo, ...) as plain fields."""

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(x, (dict, type(None))) for x in state):
            state = {**(state[0] or {}), **(state[1] or {})}   # (dict, slots)
        if isinstance(state, tuple):   # TensorProperties: (dtype, layout, requires_grad, memory_format, pin_memory)
            self.__dict__["fields"] = state
            if type(self).__name__ == "TensorProperties":
                self.__dict__["dtype"] = state[0]
            return
        self.__dict__.update(state or {})

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in self.__dict__.items())))

    def __eq__(self, other):
        return isinstance(other, _Record) and self.__dict__ == other.__dict__


def _record_class(name: str):
    return type(name, (_Record,), {})


_META_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": "bfloat16",
           "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
           "bool": np.bool_}
_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _MetaUnpickler(pickle.Unpickler):
    classes: dict = {}

    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if module in _META_MODULES:
            return self.classes.setdefault(name, _record_class(name))
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and (name in _DTYPES or name in ("strided", "contiguous_format")):
            return name
        if module == "torch.serialization" and name == "_get_layout":
            return lambda s: s
        if module == "collections" and name == "OrderedDict":
            return dict
        if module.startswith("pathlib") and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return lambda *parts: os.path.join(*parts) if parts else ""
        raise CheckpointError(f"{self.path}: refuses to unpickle {module}.{name}: not DCP metadata")


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class _TensorUnpickler(pickle.Unpickler):
    """data.pkl of a torch.save zip holding one tensor (what DCP writes per chunk)."""

    def __init__(self, f, zf: zipfile.ZipFile, root: str, where: str):
        super().__init__(f)
        self.zf, self.root, self.where = zf, root, where

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        raise CheckpointError(f"{self.where}: refuses to unpickle {module}.{name}: not a tensor")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise CheckpointError(f"{self.where}: unknown persistent id {kind!r}")
        raw = self.zf.read(f"{self.root}/data/{key}")
        if dtype == "bfloat16":
            return _bf16_to_f32(np.frombuffer(raw, dtype=np.uint16))
        return np.frombuffer(raw, dtype=dtype)

    @staticmethod
    def _rebuild(storage, offset, size, stride, *_):
        if not size:
            return np.array(storage[offset], copy=True)
        item = storage.itemsize
        return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                               strides=tuple(s * item for s in stride)).copy()


def _load_tensor_bytes(buf: bytes, where: str) -> np.ndarray:
    with zipfile.ZipFile(io.BytesIO(buf)) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        root = pkl[: -len("/data.pkl")]
        return _TensorUnpickler(io.BytesIO(zf.read(pkl)), zf, root, where).load()


def read_dcp(folder: str | os.PathLike, want=lambda key: True) -> dict[str, np.ndarray]:
    """Every tensor of a DCP folder whose flat key (``model.<name>``, ``optim.state.<name>.exp_avg``)
    passes ``want``, assembled whole from its chunks, as NumPy arrays (bf16 read as fp32)."""
    folder = Path(folder)
    path = folder / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, {folder} is not a complete checkpoint")
    with open(path, "rb") as f:
        md = _MetaUnpickler(f, path).load()
    out: dict[str, np.ndarray] = {}
    for key, tmd in md.state_dict_metadata.items():
        if type(tmd).__name__ != "TensorStorageMetadata" or not want(key):
            continue
        dt = _DTYPES.get(tmd.properties.dtype, np.float32)
        full = np.zeros(tuple(tmd.size), dtype=np.float32 if dt == "bfloat16" else dt)
        out[key] = full
    for idx, info in md.storage_data.items():
        if idx.fqn not in out:
            continue
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            chunk = _load_tensor_bytes(f.read(info.length), f"{folder / info.relative_path}")
        full = out[idx.fqn]
        if full.ndim == 0:
            out[idx.fqn] = np.asarray(chunk, dtype=full.dtype).reshape(())
            continue
        sl = tuple(slice(o, o + s) for o, s in zip(idx.offset, chunk.shape))
        full[sl] = chunk
    return out


# ------------------------------------------------------------------ this back-end's checkpoints
def resolve(load_dir: str | os.PathLike) -> Path:
    root = Path(load_dir)
    text = read_latest(root)
    ckpt = root / ("release" if text == "release" else iter_dir_name(int(text)))
    if not ((ckpt / ".metadata").is_file() or (ckpt / MODEL_FILE).is_file()):
        raise CheckpointError(f"{root / LATEST} names iteration {text!r} but {ckpt} is not a complete checkpoint; "
                              f"point the file at an existing iter_* folder")
    return ckpt


def read_state(ckpt: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(trainer state, model tensors by PyTorch-path name, optimizer tensors by flat key
    ``state.<name>.<field>``) of a portable or DCP iteration folder."""
    meta = json.loads((ckpt / STATE).read_text()) if (ckpt / STATE).is_file() else {"iteration": 0}
    if (ckpt / MODEL_FILE).is_file():
        from safetensors.numpy import load_file
        model = load_file(str(ckpt / MODEL_FILE))
        optim = load_file(str(ckpt / OPTIM_FILE)) if (ckpt / OPTIM_FILE).is_file() else {}
        return meta, model, optim
    flat = read_dcp(ckpt, lambda k: k.startswith("model.") or k.startswith("optim.state."))
    model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in flat.items() if k.startswith("optim.")}
    return meta, model, optim


def save(save_dir: str | os.PathLike, iteration: int, model_tensors: dict[str, np.ndarray],
         optim_tensors: dict[str, np.ndarray] | None, trainer_state: dict) -> Path:
    """Write ``iter_XXXXXXX`` (portable form) through a ``.partial`` folder, then ``latest``."""
    from safetensors.numpy import save_file

    save = Path(save_dir)
    final, partial = save / iter_dir_name(iteration), save / (iter_dir_name(iteration) + ".partial")
    save.mkdir(parents=True, exist_ok=True)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in model_tensors.items()}, str(partial / MODEL_FILE))
    if optim_tensors is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in optim_tensors.items()}, str(partial / OPTIM_FILE))
    meta = dict(trainer_state, iteration=iteration, format=FORMAT, backend="mindspore",
                has_optim=optim_tensors is not None, has_rng=False, has_data_state=False, world_size=1,
                layout={"world": 1, "tp": 1, "cp": 1, "ep": 1, "pp": 1})
    (partial / STATE).write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    write_text_atomic(save / LATEST, str(iteration))
    return final
