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
import mmap
import os
import pickle
import struct
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

# safetensors dtype names <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


_PAGE = mmap.ALLOCATIONGRANULARITY


def _pread_tensor(f, offset: int, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A 1-D ``dtype`` tensor of the ``nbytes`` bytes of ``f`` from ``offset``.

    The bytes are mapped (private, copy-on-write), not read: the tensor shares the kernel's page-cache
    pages, so no anonymous memory is faulted in and zeroed and no copy is made (on a VM, first-touch
    anonymous pages cost 2-10x the copy itself). Writing into the tensor copies only the touched pages
    (the file is never changed). The mapping lives as long as the tensor; its pages count in the
    process' RSS only while it does, exactly like a read buffer.
    """
    isz = torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    start = offset - offset % _PAGE
    try:
        m = mmap.mmap(f.fileno(), offset + nbytes - start, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError):  # past the end of the file, or a file system without mmap: read it
        return _read_tensor(f, offset, nbytes).view(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": it is writable (MAP_PRIVATE)
        t = torch.frombuffer(m, dtype=dtype, count=nbytes // isz, offset=offset - start)
    _register_mapping(m, t.data_ptr() - (offset - start), offset + nbytes - start, f.fileno(), start)
    return t


# ------------------------------------------------------------------------------------ file-to-file copies
# Memory mapped by _pread_tensor: [address, address + length) holds the bytes of fd from file_offset.
# A FileSink asked to write bytes of such a region copies them file to file (copy_file_range: no
# user-space copy, no page faults), as `cp` does. Entries live exactly as long as their mapping.
# Contract (all converters keep it): tensors read from an input are never modified in place.
_MAPPED: dict[int, tuple[int, int, int, int]] = {}  # key -> (address, length, fd, file offset)
_MAPPED_KEY = [0]
_FILE_FDS: dict[tuple[int, int], list[int]] = {}  # (st_dev, st_ino) -> [own dup of a fd, mappings using it]


def _register_mapping(m: mmap.mmap, address: int, length: int, fd: int, file_offset: int) -> None:
    """One dup'd descriptor per file, shared by its mappings: valid even after the reader closes its
    own, and the process does not hold one descriptor per tensor."""
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino)
    ref = _FILE_FDS.get(ident)
    if ref is None:
        ref = _FILE_FDS[ident] = [os.dup(fd), 0]
    ref[1] += 1
    key = _MAPPED_KEY[0] = _MAPPED_KEY[0] + 1
    _MAPPED[key] = (address, length, ref[0], file_offset)
    weakref.finalize(m, _unregister_mapping, key, ident)


def _unregister_mapping(key: int, ident: tuple[int, int]) -> None:
    _MAPPED.pop(key, None)
    ref = _FILE_FDS.get(ident)
    if ref is not None:
        ref[1] -= 1
        if ref[1] <= 0:
            os.close(ref[0])
            del _FILE_FDS[ident]


def _file_bytes_of(address: int, nbytes: int) -> Optional[tuple[int, int]]:
    """(fd, offset) of a file whose bytes [offset, offset + nbytes) are mapped at ``address``."""
    for a, n, fd, off in _MAPPED.values():
        if a <= address and address + nbytes <= a + n:
            return fd, off + (address - a)
    return None


def _address(mv: memoryview) -> int:
    import numpy as np

    return np.frombuffer(mv, dtype=np.uint8).ctypes.data


def pwrite_all(fd: int, mv: memoryview, pos: int) -> None:
    """All of ``mv`` at ``pos``: ``os.pwrite`` may write less than asked (Linux: at most ~2 GiB per
    call), so loop; 1 MiB per call, as one pwrite of tens of MiB into fresh page cache costs 2-7x
    the CPU (measured)."""
    mv = mv.cast("B") if mv.format != "B" else mv
    while mv.nbytes:
        k = os.pwrite(fd, mv[:1 << 20], pos)
        if k <= 0:
            raise OSError(f"pwrite wrote {k} bytes at offset {pos}")
        mv, pos = mv[k:], pos + k


class FileSink:
    """A write-only file object for ``torch.save`` / ``PyTorchFileWriter``: small writes are
    buffered; a large one whose bytes are a mapped input file region is done with
    ``os.copy_file_range`` from that file (else ``pwrite``)."""

    BIG = 1 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0  # bytes written (or copied) to the file
        self.buf = bytearray()
        self.copied = 0
        self._instead: Optional[tuple[int, int, list]] = None  # (address, nbytes, pieces)

    def substitute(self, address: int, nbytes: int, pieces: list) -> None:
        """The next write of the ``nbytes`` bytes at ``address`` (a placeholder nobody reads) writes
        the ``pieces`` (contiguous tensors, ``nbytes`` in all) one after the other instead: a record's
        data assembled in the file, never in memory."""
        self._instead = (address, nbytes, pieces)

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        if self._instead is not None and self._instead[1] == n and n and self._instead[0] == _address(mv):
            pieces, self._instead = self._instead[2], None
            for p in pieces:
                self.write(_bytes_of(p))
            return n
        if n < self.BIG:
            self.buf += mv
            if len(self.buf) >= self.BIG:
                self.flush()
            return n
        self.flush()
        src = _file_bytes_of(_address(mv), n)
        done = self._copy(src, n) if src is not None else 0
        self._pwrite(mv[done:], self.pos + done)
        self.pos += n
        return n

    def _copy(self, src: tuple[int, int], n: int) -> int:
        fd, off = src
        done = 0
        try:
            while done < n:
                k = os.copy_file_range(fd, self.fd, n - done, off + done, self.pos + done)
                if k <= 0:
                    break
                done += k
        except OSError:  # e.g. EXDEV / EINVAL on some file systems: the rest is written from memory
            pass
        self.copied += done
        return done

    def _pwrite(self, mv: memoryview, pos: int) -> None:
        pwrite_all(self.fd, mv, pos)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.flush()
        if whence == os.SEEK_CUR:
            self.pos += offset
        elif whence == os.SEEK_SET:
            self.pos = offset
        else:
            raise io.UnsupportedOperation("FileSink.seek: SEEK_END")
        return self.pos

    def tell(self) -> int:
        return self.pos + len(self.buf)

    def flush(self) -> None:
        if self.buf:
            self._pwrite(memoryview(self.buf), self.pos)
            self.pos += len(self.buf)
            self.buf = bytearray()

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.ftruncate(self.fd, self.pos)  # a trailing seek leaves a hole, as a real file would
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_tensor(f, offset: int, nbytes: int) -> torch.Tensor:
    """A fresh uint8 tensor holding ``nbytes`` bytes of ``f`` from ``offset`` (pread)."""
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
        return _pread_tensor(f, a, b - a, dtype).reshape(shape)

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
        pwrite_all(self.f.fileno(), _bytes_of(t), self.base + off)
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
        raw = _pread_tensor(self._f, start + soff * isz, extent * isz, dtype)
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


class Scratch:
    """One reusable byte buffer (grown on demand) for copying a non-contiguous tensor right before
    it is written: its pages are faulted in once, not once per tensor as a fresh ``.contiguous()``
    copy would be."""

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.uint8)

    def contiguous(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself if contiguous, else a copy of it in the buffer (valid until the next call)."""
        if t.is_contiguous():
            return t
        n = t.numel() * t.element_size()
        if self.buf.numel() < n:
            self.buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buf = torch.empty(n + (-n % (1 << 20)), dtype=torch.uint8)
        out = self.buf[:n].view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


_PLACEHOLDER: list = [None]


def _placeholder(n: int) -> torch.Tensor:
    """An ``n``-byte (or larger) buffer that is never read or written: an anonymous mapping, so it
    costs address space only (no page is ever touched). Stands in for a record's data while
    ``FileSink.substitute`` writes the real pieces."""
    t = _PLACEHOLDER[0]
    if t is None or t.numel() < n:
        m = mmap.mmap(-1, max(n, 1 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.frombuffer(m, dtype=torch.uint8)
        _PLACEHOLDER[0] = t
    return t


class PtWriter:
    """A ``torch.save``-compatible file written one tensor at a time.

    ``structure`` is the object to save with meta tensors where the real tensors go; each tensor is
    then given with ``write(path, tensor)`` (path = tuple of keys), in any order.
    """

    def __init__(self, path: Path, structure: Any, crc32: bool = False, scratch: Optional[Scratch] = None):
        """crc32: store zip CRC-32s of the records (torch.save's default). torch.load does not check
        them; leaving them out halves the writing time of large checkpoints. scratch: the buffer
        non-contiguous tensors are copied into (may be shared by several writers)."""
        self.path = Path(path)
        self.scratch = scratch or Scratch()
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
        self.sink = FileSink(self.path)
        self.w = torch._C.PyTorchFileWriter(self.sink, crc32, 64)
        self.w.write_record("data.pkl", data, len(data))
        self.w.write_record(".format_version", "1", 1)
        self.w.write_record(".storage_alignment", "64", 2)
        import sys
        self.w.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.done: set[tuple] = set()

    def write(self, path: tuple, t: torch.Tensor) -> None:
        """``t`` has the planned shape, or one dim more whose first two dims merge into the planned
        first dim (a GLU shard view from layout.glu_views)."""
        key, dtype, shape = self.slots[path]
        got = tuple(t.shape)
        if len(got) == len(shape) + 1 and shape and got[0] * got[1] == shape[0] and got[2:] == shape[1:]:
            got = shape
        if t.dtype != dtype or got != shape:
            raise ValueError(f"{self.path}: {path} is {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
        if path in self.done:
            raise ValueError(f"{self.path}: {path} written twice")
        from omnitune.convert.layout import RowCat

        if isinstance(t, RowCat):  # a lazy fusion: its pieces go to the file one by one
            n = t.numel() * t.element_size()
            pieces = t.parts
            if n and all(p.is_contiguous() for p in pieces):
                holder = _placeholder(n)
                self.sink.substitute(holder.data_ptr(), n, pieces)
                self.w.write_record(f"data/{key}", holder.untyped_storage()[:n], n)
                if self.sink._instead is not None:
                    raise RuntimeError(f"{self.path}: {path}: the record was not written through the sink")
                self.done.add(path)
                return
            t = t.materialize()
        t = self.scratch.contiguous(t)
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
        self.sink.close()


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
