"""Reading DCP checkpoints without running code from them.

torch's ``FileSystemReader.read_metadata`` reads ``<ckpt>/.metadata`` with plain ``pickle.load`` and
``DefaultLoadPlanner.load_bytes`` reads non-tensor entries with ``torch.load(weights_only=False)``:
a downloaded checkpoint folder could run any code. Every DCP read of omnitune goes through this
module instead:

- :func:`read_metadata`: ``.metadata`` through an unpickler that knows only the classes DCP
  metadata is made of (found by unpickling the metadata of omnitune's own saves, dcp.save and
  ``mm-convert hf_to_dcp``); anything else is refused naming the file. The data files it lists
  are checked to exist and to be long enough (a truncated copy is named before any read).
- :class:`SafeFileSystemReader` / :class:`SafeLoadPlanner`: what ``dcp.load`` is given, so the
  collective load reads metadata the same way and non-tensor entries with ``weights_only=True``.
- :func:`load`: ``dcp.load`` with both, its per-rank failures turned into one clear error.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from omnitune.config.errors import ConfigError
from omnitune.convert.layout import ConvertError

METADATA = ".metadata"
_DCP_META = "torch.distributed.checkpoint.metadata"
#: (module, name) of every global a DCP .metadata pickle refers to. Each is a plain data class, an
#: enum or a value lookup: calling it with any arguments runs no code of the file's choosing.
ALLOWED = {
    (_DCP_META, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                             "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                             "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),        # layout name -> torch.strided etc.
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),     # StorageMeta.checkpoint_id
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),   # Python >= 3.13
    ("pathlib._local", "WindowsPath"), ("pathlib._local", "PureWindowsPath"),
}
_DAMAGED = "the checkpoint is damaged or incomplete: copy it again, or use another iteration"


class CheckpointError(ConfigError, ConvertError):
    """A checkpoint file that cannot or must not be read. Both a ConfigError (``omnitune train`` /
    ``export`` report it) and a ConvertError (``mm-convert`` reports it): the same files are read
    by both."""


def _torch_value(name: str):
    """``torch.<name>`` when it is a dtype / layout / memory format (pickled as a global)."""
    v = getattr(torch, name, None)
    return v if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)) else None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and _torch_value(name) is not None:
            return _torch_value(name)
        raise CheckpointError(f"{self.path}: refuses to unpickle {module}.{name}: not DCP metadata (a checkpoint "
                              f"folder must not run code); use a checkpoint from a source you trust, written by "
                              f"omnitune, mm-convert or torch.distributed.checkpoint")


def read_metadata(folder: str | os.PathLike) -> Metadata:
    """The checked ``Metadata`` of a DCP folder (see the module doc); CheckpointError naming the
    file otherwise."""
    folder = Path(folder)
    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing, {folder} is not a complete DCP checkpoint; give an iter_* or "
                              f"release folder that has one") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None
    except Exception as e:  # noqa: BLE001 - truncated / garbage pickles raise many types
        raise CheckpointError(f"{path}: truncated or not DCP metadata ({type(e).__name__}: {e}); {_DAMAGED}") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict) \
            or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not DCP metadata; {_DAMAGED}")
    check_data_files(folder, md)
    return md


def check_data_files(folder: Path, md: Metadata) -> None:
    """Every data file ``md`` points at is inside ``folder`` and long enough for its entries."""
    need: dict[str, tuple[int, str]] = {}
    for idx, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        end = getattr(info, "offset", 0) + getattr(info, "length", 0)
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{folder / METADATA}: entry {getattr(idx, 'fqn', idx)!r} points at {rel!r}, "
                                  f"outside the checkpoint folder; {_DAMAGED}")
        if end > need.get(rel, (-1, ""))[0]:
            need[rel] = (end, getattr(idx, "fqn", str(idx)))
    for rel, (end, fqn) in sorted(need.items()):
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {folder / METADATA}); {_DAMAGED}")
        size = p.stat().st_size
        if size < end:
            raise CheckpointError(f"{p}: truncated: {size} bytes, {folder / METADATA} needs {end} (entry {fqn!r}); "
                                  f"{_DAMAGED}")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by :func:`read_metadata` (no rank-local
    fallback: omnitune's saves write one global .metadata), and whose read errors name the file."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata | None = None):
        """metadata: already read (and checked) by :func:`read_metadata`; not read again."""
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:  # noqa: D102 - no *args/**kwargs: DCP then skips rank-local files
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = self._metadata if self._metadata is not None else read_metadata(self.path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        """One file at a time, so that a file that does not decode is named."""
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        fut = None
        for rel, items in by_file.items():
            try:
                fut = super().read_data(dataclasses.replace(plan, items=items), planner)
                fut.wait()
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - torch.load / zip errors of a damaged file
                raise CheckpointError(f"{Path(self.path) / rel}: cannot be decoded ({_last_line(e)}); "
                                      f"{_DAMAGED}") from None
        if fut is None:
            fut = super().read_data(plan, planner)
        return fut


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters, ``checkpoint_version``) with
    ``torch.load(weights_only=True)``: plain numbers, strings and containers only."""

    def __init__(self, folder: str | os.PathLike, **kw):
        super().__init__(**kw)
        self.folder = Path(folder)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError for a refused global
            info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
            where = self.folder / info.relative_path if info is not None else self.folder
            raise CheckpointError(f"{where}: entry {fqn!r} refused by torch.load(weights_only=True) "
                                  f"({_last_line(e)}): not plain checkpoint data (a checkpoint folder must not "
                                  f"run code); use a checkpoint from a source you trust") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _last_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def root_cause(e: BaseException) -> BaseException:
    """The first CheckpointError (else the first error) a DCP ``CheckpointException`` wraps."""
    failures = getattr(e, "failures", None)
    if not failures:
        return e
    errs = [exc for exc, _ in failures.values()]
    return next((x for x in errs if isinstance(x, CheckpointError)), errs[0])


def load(state: dict, folder: str | os.PathLike, *, no_dist: bool | None = None) -> None:
    """``dcp.load(state, folder)`` through the safe reader and planner. Collective unless
    ``no_dist`` (default: no process group). Any failure is a CheckpointError naming the file."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    md = read_metadata(folder)   # a clear error before DCP starts (it logs tracebacks on metadata errors)
    if no_dist is None:
        no_dist = not dist.is_initialized()
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(folder), md), planner=SafeLoadPlanner(folder),
                 no_dist=no_dist)
    except CheckpointException as e:
        cause = root_cause(e)
        if isinstance(cause, CheckpointError):
            raise CheckpointError(str(cause)) from None
        raise CheckpointError(f"{folder}: cannot be loaded ({_last_line(cause)}); does the checkpoint belong to "
                              f"this model?") from None
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{folder}: cannot be loaded ({_last_line(e)}); does the checkpoint belong to "
                              f"this model?") from None
