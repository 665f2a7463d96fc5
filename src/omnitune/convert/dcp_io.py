"""Streaming torch.distributed.checkpoint (DCP) files, one tensor at a time.

:class:`DcpWriter` writes the same files ``dcp.save`` / ``FileSystemWriter`` writes in one process
(``__0_0.distcp`` holding each item as a ``torch.save`` record, ``.metadata`` pickled ``Metadata``
with the planner's flattening map), so ``dcp.load`` and MindSpeed-MM's readers load it; but it takes
the tensors one by one instead of needing the whole state dict in memory.

:class:`DcpIndex` reads one tensor of a DCP checkpoint (also a sharded one saved by several ranks:
its chunks are assembled) without loading the rest.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)

from omnitune.checkpoint.safe_dcp import CheckpointError, read_metadata
from omnitune.convert.stream import FileSink

DATA_FILE = "__0_0.distcp"


class DcpWriter:
    """``add(path, value)`` for each leaf of the nested state dict (path = tuple of dict keys; the
    DCP name is the keys joined by '.'), then ``finish()``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.f = FileSink(self.folder / DATA_FILE)  # bytes of mapped input tensors: copied file to file
        self.sd_meta: dict[str, Any] = {}
        self.planner: dict[str, tuple] = {}
        self.storage: dict[MetadataIndex, _StorageInfo] = {}

    def add(self, path: tuple, value: Any) -> None:
        fqn = ".".join(str(p) for p in path)
        if fqn in self.sd_meta:
            raise ValueError(f"DCP entry {fqn!r} written twice")
        offset = self.f.tell()
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous()
            crc = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)  # as PtWriter: torch.load does not check them
            try:
                torch.save(t, self.f)
            finally:
                torch.serialization.set_crc32_options(crc)
            zeros = torch.Size([0] * t.dim())
            self.sd_meta[fqn] = TensorStorageMetadata(properties=TensorProperties.create_from_tensor(t),
                                                      size=t.size(),
                                                      chunks=[ChunkStorageMetadata(offsets=zeros, sizes=t.size())])
            index = MetadataIndex(fqn, zeros)
        else:
            buf = io.BytesIO()
            torch.save(value, buf)
            self.f.write(buf.getbuffer())
            self.sd_meta[fqn] = BytesStorageMetadata()
            index = MetadataIndex(fqn)
        self.planner[fqn] = tuple(path)
        self.storage[index] = _StorageInfo(relative_path=DATA_FILE, offset=offset, length=self.f.tell() - offset)

    def finish(self) -> None:
        self.f.close()
        md = Metadata(state_dict_metadata=self.sd_meta, planner_data=self.planner, storage_data=self.storage,
                      version=CURRENT_DCP_VERSION)
        tmp = self.folder / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(md, f)
        os.replace(tmp, self.folder / ".metadata")


class DcpIndex:
    """The entries of a DCP checkpoint folder, each readable on its own."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not (self.folder / ".metadata").is_file():
            raise FileNotFoundError(f"{self.folder} is not a DCP checkpoint (no .metadata)")
        # not FileSystemReader.read_metadata: it unpickles anything (a checkpoint must not run code)
        self.md: Metadata = read_metadata(self.folder)
        self.chunks: dict[str, list[tuple[torch.Size, _StorageInfo]]] = {}
        for idx, info in self.md.storage_data.items():
            self.chunks.setdefault(idx.fqn, []).append((idx.offset, info))

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def meta(self, fqn: str) -> torch.Tensor:
        m = self.md.state_dict_metadata[fqn]
        return torch.empty(m.size, dtype=m.properties.dtype, device="meta")

    def _item(self, info: _StorageInfo):
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{self.folder}: entries written with storage transforms "
                             f"{info.transform_descriptors} are not supported")
        path = self.folder / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged record, or a global weights_only refuses
            first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)[:300]
            raise CheckpointError(f"{path}: the entry at byte {info.offset} cannot be read with "
                                  f"torch.load(weights_only=True) ({first}); the checkpoint is damaged or "
                                  f"not plain tensors: copy it again from a source you trust") from None

    def read(self, fqn: str) -> torch.Tensor:
        m = self.md.state_dict_metadata[fqn]
        parts = self.chunks[fqn]
        if len(parts) == 1 and tuple(parts[0][0] or ()) == (0,) * len(m.size):
            t = self._item(parts[0][1])
            if tuple(t.shape) == tuple(m.size):
                return t
        out = torch.empty(m.size, dtype=m.properties.dtype)
        for offset, info in parts:
            piece = self._item(info)
            view = out
            for d, (o, s) in enumerate(zip(offset, piece.shape)):
                view = view.narrow(d, o, s)
            view.copy_(piece)
        return out

    def read_bytes_entry(self, fqn: str):
        (_, info), = self.chunks[fqn]
        return self._item(info)
