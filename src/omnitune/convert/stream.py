"""Bounded-memory tensor file I/O for the converters.

The converters never hold the whole model: they plan every output file from metadata first (meta
tensors: shapes and dtypes only), then move one layer at a time, reading only the bytes they need
and writing each tensor into its place as soon as it exists.

- :class:`SafetensorsIndex` / :class:`SafetensorsWriter`: read a tensor of a ``*.safetensors`` file
  with one ``pread`` (no mmap, so no file pages linger in the process' RSS); write a file whose
  header is known up front, tensor by tensor, in any order.
- :class:`PtIndex`: the tensors of a ``torch.save`` file (Megatron ``model_optim_rng.pt``) by
  position: the structure is read with ``torch.load(weights_only=True, mmap=True)`` (no tensor data
  touched), each tensor's bytes are then read with one ``pread``.
- :class:`PtWriter`: writes a file that ``torch.load`` reads exactly like one written by
  ``torch.save`` (same zip records, same pickle), but streams the tensors in one at a time.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

# safetensors dtype names <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def _pread_tensor(f, offset: int, nbytes: int) -> torch.Tensor:
    """A fresh uint8 tensor holding ``nbytes`` bytes of ``f`` from ``offset``."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(buf.numpy())
        got = os.preadv(f.fileno(), [view], offset)
        while got < nbytes:  # short reads happen on some file systems
            n = os.preadv(f.fileno(), [view[got:]], offset + got)
            if n <= 0:
                raise OSError(f"{f.name}: unexpected end of file at byte {offset + got}")
            got += n
    return buf


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# ------------------------------------------------------------------------------------ safetensors
class SafetensorsIndex:
    """Every tensor of a folder's ``*.safetensors`` files, by name, from the headers alone."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self.file_keys: dict[str, list[str]] = {}
        self.file_meta: dict[str, dict] = {}
        self._handles: dict[Path, Any] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            base = 8 + n
            self.file_meta[path.name] = header.pop("__metadata__", None) or {}
            keys = []
            for k, info in header.items():
                if info["dtype"] not in ST_DTYPES:
                    raise ValueError(f"{path}: tensor {k!r} has unsupported dtype {info['dtype']}")
                a, b = info["data_offsets"]
                self.entries[k] = (path, ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + a, base + b)
                keys.append(k)
            self.file_keys[path.name] = keys

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def file_of(self, key: str) -> str:
        return self.entries[key][0].name

    def meta(self, key: str) -> torch.Tensor:
        _, dtype, shape, _, _ = self.entries[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def read(self, key: str) -> torch.Tensor:
        path, dtype, shape, a, b = self.entries[key]
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "rb")
        return _pread_tensor(f, a, b - a).view(dtype).reshape(shape)

    def nbytes(self, key: str) -> int:
        _, _, _, a, b = self.entries[key]
        return b - a

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class SafetensorsWriter:
    """A safetensors file whose tensor list is known up front; tensors arrive in any order."""

    def __init__(self, path: Path, metas: dict[str, torch.Tensor], metadata: Optional[dict] = None):
        self.path = Path(path)
        header, off = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.slots: dict[str, tuple[int, int, torch.dtype, tuple]] = {}
        for k, t in metas.items():
            n = t.numel() * t.element_size()
            header[k] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
            self.slots[k] = (off, n, t.dtype, tuple(t.shape))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes
        self.base = 8 + len(raw)
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.base + off)
        self.done: set[str] = set()

    def write(self, key: str, t: torch.Tensor) -> None:
        off, n, dtype, shape = self.slots[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{self.path.name}: {key!r} is {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
        os.pwrite(self.f.fileno(), _bytes_of(t), self.base + off)
        self.done.add(key)

    def close(self) -> None:
        self.f.close()
        missing = set(self.slots) - self.done
        if missing:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")


# ------------------------------------------------------------------------------------ torch.save files
def _walk_tensors(obj, path=()):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_tensors(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, path + (i,))


class PtIndex:
    """The tensors of a ``torch.save`` file, each readable on its own with one pread.

    ``content`` is the loaded object with every tensor replaced by a meta tensor (shape, dtype);
    ``read(path)`` returns the real tensor at that path (a tuple of dict keys).
    """

    def __init__(self, path: Path, load_fn=None):
        import argparse

        self.path = Path(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = (load_fn or torch.load)(self.path, map_location="cpu", weights_only=True, mmap=True)
        reader = torch._C.PyTorchFileReader(str(self.path))
        rec_offsets = sorted(reader.get_record_offset(r) for r in reader.get_all_records() if r.startswith("data/"))
        del reader
        tensors = list(_walk_tensors(content))
        ptrs = {t.untyped_storage().data_ptr() for _, t in tensors if t.untyped_storage().nbytes()}
        self.locs: dict[tuple, tuple[int, torch.dtype, tuple, tuple, int]] = {}
        if ptrs:
            base = min(ptrs) - rec_offsets[0]
            if not {p - base for p in ptrs} <= set(rec_offsets):
                raise ValueError(f"{self.path}: cannot locate the tensors' bytes in the file")
        for p, t in tensors:
            st = t.untyped_storage()
            start = st.data_ptr() - base if st.nbytes() else 0
            self.locs[p] = (start, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        self.content = _replace_tensors(content, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))
        del content, tensors
        self._f = None

    def read(self, path: tuple) -> torch.Tensor:
        start, dtype, shape, stride, soff = self.locs[path]
        isz = torch.empty((), dtype=dtype).element_size()
        extent = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
        if self._f is None:
            self._f = open(self.path, "rb")
        raw = _pread_tensor(self._f, start + soff * isz, extent * isz).view(dtype)
        if raw.numel() == 0:
            return torch.empty(shape, dtype=dtype)
        return raw.as_strided(shape, stride)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _replace_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _replace_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _replace_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_replace_tensors(v, fn) for v in obj)
    return obj


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as torch.save pickles a contiguous CPU tensor with its own storage."""

    def __init__(self, storage: _StorageRef, shape: tuple):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


class PtWriter:
    """A ``torch.save``-compatible file written one tensor at a time.

    ``structure`` is the object to save with meta tensors where the real tensors go; each tensor is
    then given with ``write(path, tensor)`` (path = tuple of keys), in any order.
    """

    def __init__(self, path: Path, structure: Any, crc32: bool = False):
        """crc32: store zip CRC-32s of the records (torch.save's default). torch.load does not check
        them; leaving them out halves the writing time of large checkpoints."""
        self.path = Path(path)
        self.slots: dict[tuple, tuple[str, torch.dtype, tuple]] = {}
        counter = [0]

        def to_ref(t: torch.Tensor, p):
            key = str(counter[0])
            counter[0] += 1
            self.slots[p] = (key, t.dtype, tuple(t.shape))
            return _TensorRef(_StorageRef(key, t.dtype, t.numel()), tuple(t.shape))

        refs = _replace_paths(structure, to_ref)

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _StorageRef):
                    storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
                    return ("storage", storage_type, obj.key, "cpu", obj.numel)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(refs)
        data = buf.getvalue()
        self.w = torch._C.PyTorchFileWriter(str(self.path), crc32, 64)
        self.w.write_record("data.pkl", data, len(data))
        self.w.write_record(".format_version", "1", 1)
        self.w.write_record(".storage_alignment", "64", 2)
        import sys
        self.w.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.done: set[tuple] = set()

    def write(self, path: tuple, t: torch.Tensor) -> None:
        key, dtype, shape = self.slots[path]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{self.path}: {path} is {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
        if path in self.done:
            raise ValueError(f"{self.path}: {path} written twice")
        t = t.contiguous()
        n = t.numel() * t.element_size()
        if n:
            off = t.storage_offset() * t.element_size()
            self.w.write_record(f"data/{key}", t.untyped_storage()[off:off + n], n)
        else:
            self.w.write_record(f"data/{key}", b"", 0)
        self.done.add(path)

    def close(self) -> None:
        missing = set(self.slots) - self.done
        if missing:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")
        self.w.write_end_of_file()
        del self.w


def _replace_paths(obj, fn, path=()):
    if isinstance(obj, torch.Tensor):
        return fn(obj, path)
    if isinstance(obj, dict):
        return type(obj)((k, _replace_paths(v, fn, path + (k,))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_paths(v, fn, path + (i,)) for i, v in enumerate(obj))
    return obj


def iter_tensor_paths(obj) -> Iterable[tuple]:
    for p, _ in _walk_tensors(obj):
        yield p
