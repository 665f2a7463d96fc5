"""``--init-model-with-meta-device``: materialise a model built on the meta device and already
sharded (FSDP2 ``fully_shard``, DTensor TP/EP plans), then fill every rank's *own* shards only.

Flow (the trainer's order)::

    hf = build_meta_model(family, config)            # train/model.py: HF class on torch.device("meta")
    freeze -> TrainModel -> TP / EP / CP plans -> apply_fsdp
    materialize_and_load(train_model, family, kind, path)      # this module
    optimizer

How a shard is found: for every parameter / persistent buffer, :func:`local_index` turns its
DTensor placements (Shard on any dim, _StridedShard from FSDP2-over-TP, Replicate; any mesh
dimensionality) into the global indices it holds along each tensor dim. The source is then asked
for exactly that box:

- ``hf``: safetensors tensors are read through private file mappings, about 32 MiB of rows at a
  time (:func:`copy_rows`), so only this rank's box is ever paged in. Folder names -> module names
  go through transformers' own conversion mapping (renames, the Omni ``thinker.`` prefix); a weight
  transformers builds from several tensors (per-expert MoE weights stacked into
  ``experts.gate_up_proj``, transposed expert layouts) is built with transformers' converter ops,
  one target at a time (only this rank's experts when the expert dim is sharded).
- ``mm``: Megatron-layout folders (any TP/PP/VPP, hetero TP): each mm tensor alone, its TP pieces
  never merged: the row permutation the family keymap applies (qkv interleave, gate/up fusion) is
  traced on an index column, so each needed row is read from the TP piece holding it. A
  MindSpeed-MM DCP release (``hf_to_dcp`` output; also kind ``dcp``) is read entry by entry from
  the mapped .distcp record, the keymap's reshape/transpose applied as a view.
- ``resume`` (or ``dcp``): an omnitune training checkpoint: ``torch.distributed.checkpoint.load``
  into the sharded state dict, which reads only the chunks overlapping the local shards.

Afterwards: non-persistent buffers (rotary ``inv_freq``, Whisper-style sinusoid tables), lost on
meta, are recomputed by the HF model's own ``_init_weights`` for their module; tied weights are
checked (FSDP2 keeps one shared parameter; plain modules are re-tied) or tied by value; a
parameter the checkpoint lacks is an error naming it, except ``family.unused_parameters``
(zero-filled, reported).

Peak host memory per rank: its shards + one ~32 MiB block of the source being copied; a weight
built whole (MoE converter targets, an mm tensor whose keymap op is not a row permutation) adds
that one tensor (``LoadReport.built_whole`` lists them).
"""
from __future__ import annotations

import io
import os
import re
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from omnitune.checkpoint.mm_load import is_dcp_release
from omnitune.config.errors import ConfigError

KINDS = ("hf", "mm", "dcp", "resume")


# ------------------------------------------------------------------------------------ local boxes
def _placement_types():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    return Shard, _StridedShard


def local_index_from(global_shape, mesh_shape, coord, placements) -> list[Optional[torch.Tensor]]:
    """Per tensor dim, the (sorted) global indices this mesh coordinate holds, or None for a whole
    dim. Placements are applied left to right as DTensor does (``_StridedShard`` = FSDP2's shard of
    an already TP-sharded dim)."""
    from torch.distributed.tensor.placement_types import _StridedShardOffsetMode
    Shard, StridedShard = _placement_types()
    idx: dict[int, torch.Tensor] = {}
    for i, p in enumerate(placements):
        if isinstance(p, StridedShard):
            cur = idx.get(p.dim, torch.arange(global_shape[p.dim]))
            size, offs = p.local_shard_size_and_offset(len(cur), mesh_shape[i], coord[i],
                                                       offset_mode=_StridedShardOffsetMode.ALL)
            sel = torch.tensor(offs, dtype=torch.long) if size else torch.empty(0, dtype=torch.long)
        elif isinstance(p, Shard):
            cur = idx.get(p.dim, torch.arange(global_shape[p.dim]))
            size, off = Shard.local_shard_size_and_offset(len(cur), mesh_shape[i], coord[i])
            sel = torch.arange(off, off + size)
        elif p.is_replicate():
            continue
        else:
            raise ValueError(f"placement {p} cannot be loaded from a checkpoint (only Shard / Replicate)")
        idx[p.dim] = cur[sel]
    return [idx.get(d) for d in range(len(global_shape))]


def local_index(t: torch.Tensor) -> tuple[list[Optional[torch.Tensor]], torch.Tensor]:
    """(per-dim global indices of this rank's part or None, the local tensor to write into)."""
    from torch.distributed.tensor import DTensor
    if not isinstance(t, DTensor):
        return [None] * t.dim(), t.data
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError("this rank is not part of the parameter's device mesh")
    idx = local_index_from(tuple(t.shape), tuple(mesh.shape), coord, t.placements)
    local = t._local_tensor
    want = tuple(len(ix) if ix is not None else n for ix, n in zip(idx, t.shape))
    if tuple(local.shape) != want:
        raise RuntimeError(f"local shard {tuple(local.shape)} of a {tuple(t.shape)} DTensor with placements "
                           f"{t.placements} is not the {want} its placements give")
    return idx, local


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t.data


def _run(ix: torch.Tensor) -> Optional[tuple[int, int]]:
    """(start, length) when ``ix`` is one consecutive run, else None."""
    n = len(ix)
    if n == 0:
        return 0, 0
    a = int(ix[0])
    if int(ix[-1]) - a + 1 == n and (n < 3 or bool((ix[1:] - ix[:-1] == 1).all())):
        return a, n
    return None


def gather(src, idx: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """``src`` restricted to the box ``idx`` (per-dim indices or None). Consecutive runs are views
    (a mapped source then faults in only the box's pages); other index sets copy."""
    out, later = src, []
    for d, ix in enumerate(idx):
        if ix is None:
            continue
        r = _run(ix)
        if r is not None:
            out = out.narrow(d, *r)
        else:
            lo, hi = int(ix.min()), int(ix.max()) + 1
            out = out.narrow(d, lo, hi - lo)
            later.append((d, ix - lo))
    for d, ix in later:
        out = out.index_select(d, ix)
    return out


BLOCK = 32 << 20   # bytes of a source mapped at a time


class _Mapped:
    """A tensor stored in a file: the strided view (shape, stride, storage offset, in elements) of
    the bytes from ``base``. Row ranges are mapped on demand (``stream._pread_tensor``: private
    mapping, pages faulted in only where copied, gone when the view is)."""

    def __init__(self, f, base: int, dtype: torch.dtype, shape, stride, soff: int = 0):
        self.f, self.base, self.dtype = f, base, dtype
        self.shape, self.stride, self.soff = tuple(shape), tuple(stride), soff
        self.isz = torch.empty((), dtype=dtype).element_size()

    @classmethod
    def of_view(cls, f, base: int, view: torch.Tensor) -> "_Mapped":
        return cls(f, base, view.dtype, view.shape, view.stride(), view.storage_offset())

    def rows(self, a: int, b: int) -> torch.Tensor:
        from omnitune.convert.stream import _pread_tensor

        shape = (b - a, *self.shape[1:])
        if not all(shape):
            return torch.empty(shape, dtype=self.dtype)
        rest = 1 + sum((n - 1) * st for n, st in zip(self.shape[1:], self.stride[1:]))
        lo = self.soff + a * self.stride[0]
        hi = self.soff + (b - 1) * self.stride[0] + rest
        raw = _pread_tensor(self.f, self.base + lo * self.isz, (hi - lo) * self.isz, self.dtype)
        return raw.as_strided(shape, self.stride)

    def scalar(self) -> torch.Tensor:
        from omnitune.convert.stream import _pread_tensor
        return _pread_tensor(self.f, self.base + self.soff * self.isz, self.isz, self.dtype).view(())

    def step(self) -> int:
        """Rows per mapping: about BLOCK bytes (all rows when rows interleave in the file)."""
        rest = 1 + sum((n - 1) * st for n, st in zip(self.shape[1:], self.stride[1:]))
        if self.stride[0] < rest:
            return max(1, self.shape[0])
        return max(1, BLOCK // max(1, self.stride[0] * self.isz))


class _InMemory:
    """A tensor already in memory, behind the same row interface as :class:`_Mapped`."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.t.narrow(0, a, b - a)

    def step(self) -> int:
        return max(1, self.shape[0])


def _source(t) -> "_Mapped | _InMemory":
    return t if isinstance(t, (_Mapped, _InMemory)) else _InMemory(t)


def _row_runs(rows: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first source row, length, first position) of each consecutive run of ``rows``."""
    if not len(rows):
        return []
    cut = ((rows[1:] - rows[:-1]) != 1).nonzero().flatten() + 1
    starts = [0, *cut.tolist()]
    ends = [*cut.tolist(), len(rows)]
    return [(int(rows[a]), b - a, a) for a, b in zip(starts, ends)]


def copy_rows(src, rows: torch.Tensor, rest: list, dst: torch.Tensor) -> None:
    """``dst[j] = src[rows[j]][rest...]``: the source rows are read run by run, about BLOCK bytes
    of a mapped source at a time, so at most that much of it is resident besides ``dst``."""
    src = _source(src)
    step = src.step()
    for s0, n, j in _row_runs(rows):
        for b in range(0, n, step):
            k = min(step, n - b)
            blk = src.rows(s0 + b, s0 + b + k)
            dst.narrow(0, j + b, k).copy_(gather(blk, [None, *rest]))
            del blk


def _into(out: torch.Tensor, dim: int, pos: torch.Tensor, write) -> None:
    """``write(dst)`` fills ``out`` at positions ``pos`` of ``dim``: straight into a slice of
    ``out`` when ``pos`` is one run, else through a temporary and ``index_copy_``."""
    r = _run(pos)
    if r is not None:
        write(out.narrow(dim, *r))
    else:
        shape = list(out.shape)
        shape[dim] = len(pos)
        tmp = torch.empty(shape, dtype=out.dtype, device=out.device)
        write(tmp)
        out.index_copy_(dim, pos, tmp)


# ------------------------------------------------------------------------------------ targets
@dataclass
class _Target:
    """One distinct tensor of the model (tied names share one)."""
    names: list[str]
    tensor: torch.Tensor
    shape: tuple
    idx: list
    local: torch.Tensor
    filled: bool = False

    def fill(self, src, what: str) -> None:
        """``src``: this target's full-shaped source (a tensor or a :class:`_Mapped`)."""
        if tuple(src.shape) != self.shape:
            raise ConfigError(f"{what}: {tuple(src.shape)} does not fit the model's {self.names[0]} "
                              f"{self.shape}; does the checkpoint belong to this config.json?")
        if not self.shape:   # 0-d
            self.local.copy_(src.scalar() if isinstance(src, _Mapped) else src)
        else:
            rows = self.idx[0] if self.idx[0] is not None else torch.arange(self.shape[0])
            copy_rows(src, rows, self.idx[1:], self.local)
        self.filled = True


def _targets(hf: nn.Module) -> dict[str, _Target]:
    """Every name of every parameter and persistent buffer -> its target (shared by tied names)."""
    by_id: dict[int, _Target] = {}
    out: dict[str, _Target] = {}
    persistent = set(hf.state_dict(keep_vars=True))
    items = list(hf.named_parameters(remove_duplicate=False))
    items += [(n, b) for n, b in hf.named_buffers(remove_duplicate=False) if n in persistent]
    for name, t in items:
        tg = by_id.get(id(t))
        if tg is None:
            idx, local = local_index(t)
            tg = by_id[id(t)] = _Target([], t, tuple(t.shape), idx, local)
        tg.names.append(name)
        out[name] = tg
    return out


def _unique(targets: dict[str, _Target]) -> list[_Target]:
    seen, out = set(), []
    for tg in targets.values():
        if id(tg) not in seen:
            seen.add(id(tg))
            out.append(tg)
    return out


# ------------------------------------------------------------------------------------ HF folder
class _HfFolder:
    """Safetensors folder -> targets, names mapped as transformers' from_pretrained maps them."""

    def __init__(self, path, family, hf: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        from omnitune.convert.stream import SafetensorsIndex

        self.path, self.hf = Path(path), hf
        self.whole: list[str] = []
        self.files: dict = {}
        self.idx = SafetensorsIndex(self.path)
        if not self.idx.keys():
            raise ConfigError(f"--load {path}: no *.safetensors weights")
        prefix = family.folder_prefix
        mapping = get_model_conversion_mapping(hf, {"^" + re.escape(prefix): ""} if prefix else None)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        model_keys = dict.fromkeys(hf.state_dict(keep_vars=True), True)
        base = hf.base_model_prefix
        self.direct: dict[str, str] = {}                       # module name -> folder name
        self.converted: dict[str, tuple] = {}                   # first target -> (converter, [(folder name, pattern)])
        for key in sorted(self.idx.keys(), key=dot_natural_key):   # the order transformers stacks experts in
            name, pattern = rename_source_key(key, renamings, converters, base, model_keys)
            if name not in model_keys and key in model_keys:
                name, pattern = rename_source_key(key, [], [], base_model_prefix=base, meta_state_dict=model_keys)
            if name not in model_keys:
                continue          # e.g. an Omni folder's talker / token2wav: not part of the trained model
            if pattern is None:
                self.direct[name] = key
            else:
                conv, parts = self.converted.setdefault(name, (by_pattern[pattern], []))
                parts.append((key, pattern))

    def fill(self, targets: dict[str, _Target]) -> None:
        for name, key in self.direct.items():
            path, dtype, shape, a, _ = self.idx.entries[key]
            f = self.files.get(path)
            if f is None:
                f = self.files[path] = open(path, "rb")
            src = _Mapped(f, a, dtype, shape, torch.empty(shape, device="meta").stride())
            targets[name].fill(src, f"--load {self.path}: {key!r}")
        for first, (conv, parts) in self.converted.items():
            self._fill_converted(first, conv, parts, targets)

    def _fill_converted(self, first: str, proto, parts, targets) -> None:
        from transformers.core_model_loading import MergeModulelist

        tg = targets[first]
        dtype = tg.local.dtype
        conv = deepcopy(proto)
        lists: dict[str, list[str]] = {}
        for key, pattern in parts:
            lists.setdefault(pattern, []).append(key)
        # experts stacked on dim 0 (MergeModulelist): when dim 0 is sharded, build only this rank's experts
        sub = None
        if (tg.idx[0] is not None and len(conv.target_patterns) == 1 and isinstance(conv.operations[0], MergeModulelist)
                and conv.operations[0].dim == 0 and all(len(v) == tg.shape[0] for v in lists.values())):
            sub = tg.idx[0].tolist()
            lists = {p: [v[i] for i in sub] for p, v in lists.items()}
        for pattern, keys in lists.items():
            for key in keys:
                conv.add_tensor(first, key, pattern, lambda k=key: self.idx.read(k).to(dtype))
        out = conv.convert(first, model=self.hf, config=self.hf.config)
        self.whole.append(first + (f" ({len(sub)} of {tg.shape[0]} experts)" if sub is not None else ""))
        for name, t in out.items():
            t = t[0] if isinstance(t, list) else t
            if name not in targets:
                raise ConfigError(f"--load {self.path}: transformers builds {name!r}, which the model does not have")
            tn = targets[name]
            if sub is not None and tn is tg:
                want = (len(sub), *tg.shape[1:])
                if tuple(t.shape) != want:
                    raise ConfigError(f"--load {self.path}: {name!r} built as {tuple(t.shape)}, expected {want}")
                copy_rows(t, torch.arange(len(sub)), tg.idx[1:], tn.local)
                tn.filled = True
            else:
                tn.fill(t, f"--load {self.path}: {name!r} (from {len(parts)} tensors)")
        del out

    def close(self):
        self.idx.close()
        for f in self.files.values():
            f.close()


# ------------------------------------------------------------------------------------ mm folder
_CODE = 40            # trace code = piece << 40 | row of the piece
_MASK = (1 << _CODE) - 1


def _is_selection(traced: dict, rows: list[int]) -> bool:
    """The traced outputs only pick rows: every code names a real row of a real piece, none twice."""
    c = torch.cat([t.flatten() for t in traced.values()]) if traced else torch.empty(0, dtype=torch.int64)
    if c.dtype != torch.int64:
        return False
    which, local = c >> _CODE, c & _MASK
    if len(c) and (int(which.min()) < 0 or int(which.max()) >= len(rows)):
        return False
    if bool((local >= torch.tensor(rows)[which]).any()):
        return False
    return len(torch.unique(c)) == len(c)


class _MmFolder:
    """Megatron ("mm") folder -> targets, one mm tensor at a time, each row from its TP piece."""

    def __init__(self, path, family, hf: nn.Module, targets: dict[str, _Target]):
        from omnitune.checkpoint.mm_load import _to_model_key, keymap_for
        from omnitune.convert import engine as E
        from omnitune.convert import layout as L

        self.path, self.L = Path(path), L
        self.whole: list[str] = []
        self.handles: dict = {}
        km = self.km = keymap_for(family)
        self.sizes = km.Sizes.from_config(hf.config.to_dict())
        self.mods = km.modules(self.sizes)
        self.to_model = _to_model_key(km)
        self.model_name = type(hf).__name__
        model_meta = {n: torch.empty(tg.shape, dtype=tg.local.dtype, device="meta") for n, tg in targets.items()}
        to_hf = getattr(km, "model_keys_to_hf", None)
        hf_meta = to_hf(model_meta) if to_hf else km.normalize_hf_keys(model_meta)[0]
        full_meta = km.hf_to_mm(hf_meta, self.sizes, 1)
        try:
            self.par = E.detect_layout(self.path, self.mods, km, self.sizes, full_meta)
            L.validate_layout(self.par, self.mods, field_prefix=f"--load {path}",
                              divisible=km.tp_divisibility(self.sizes))
            self.src = E.MmSource(self.path, self.par, self.mods, km, "--load")
        except L.ConvertError as e:
            raise ConfigError(f"{e} (layout read from the folder; does it belong to this model's config.json?)") from e

    def fill(self, targets: dict[str, _Target]) -> None:
        for g, keys in self.src.groups.items():
            for mk in keys:
                self._fill_key(mk, targets)

    def _pieces(self, mk):
        kind = self.km.tp_rule(mk)
        m = next((m for m in self.mods if mk.startswith(m.key_prefix)), None)
        tp = self.par.module_tp(m.tp_field) if m else self.par.tp_size
        ranks = list(range(tp)) if kind and tp > 1 else [0]
        return kind, ranks

    def _read(self, rank: int, mk: str) -> torch.Tensor:
        f, where = self.src.loc[(rank, mk)]
        return self.src.files[f].read(where)

    def _mapped(self, rank: int, mk: str) -> _Mapped:
        """TP piece ``rank`` of ``mk`` in its model_optim_rng.pt (located by PtIndex)."""
        f, where = self.src.loc[(rank, mk)]
        ix = self.src.files[f]
        start, dtype, shape, stride, soff = ix.locs[where]
        h = self.handles.get(ix.path)
        if h is None:
            h = self.handles[ix.path] = open(ix.path, "rb")
        return _Mapped(h, start, dtype, shape, stride, soff)

    def _merge(self, kind, pieces):
        return self.L.MERGERS[kind](pieces) if len(pieces) > 1 else pieces[0]

    def _fill_key(self, mk: str, targets) -> None:
        kind, ranks = self._pieces(mk)
        metas = [self.src.metas[r][mk] for r in ranks]
        hf_meta = self.km.mm_to_hf({mk: self._merge(kind, metas)}, self.sizes)
        wanted = {}
        for h, meta in hf_meta.items():
            name = self.to_model(h)
            if name not in targets:
                raise ConfigError(f"--load {self.path}: weight {h!r} has no place in the {self.model_name} "
                                  f"({name!r})")
            tg = targets[name]
            if tuple(meta.shape) != tg.shape:
                raise ConfigError(f"--load {self.path}: {h!r} is {tuple(meta.shape)}, the model's {name!r} is "
                                  f"{tg.shape}; does the checkpoint belong to this config.json?")
            wanted[h] = tg
        nd = metas[0].dim()
        codes = [(torch.arange(m.shape[0], dtype=torch.int64) + (i << _CODE)).view(m.shape[0], *([1] * (nd - 1)))
                 for i, m in enumerate(metas)] if nd else None
        traced = self.km.mm_to_hf({mk: self._merge(kind, codes)}, self.sizes) if nd else None
        row_split = kind == "row" and len(ranks) > 1
        width = len(ranks) if row_split else 1
        ok = traced is not None and set(traced) == set(hf_meta) and all(
            traced[h].dim() == nd and traced[h].shape[0] == hf_meta[h].shape[0] and traced[h][0].numel() == width
            for h in hf_meta) and _is_selection(traced, [m.shape[0] for m in metas])
        if not ok:   # a keymap op that is not a row permutation: build the full tensor (one mm tensor)
            self.whole.append(mk)
            full = self.km.mm_to_hf({mk: self._merge(kind, [self._read(r, mk) for r in ranks])}, self.sizes)
            for h, tg in wanted.items():
                tg.fill(full[h], f"--load {self.path}: {h!r}")
            return
        for h, tg in wanted.items():
            self._fill_traced(mk, ranks, metas, traced[h].reshape(traced[h].shape[0], -1), row_split, tg)

    def _fill_traced(self, mk, ranks, metas, code, row_split, tg: _Target) -> None:
        idx, out = tg.idx, tg.local
        rows = idx[0] if idx[0] is not None else torch.arange(tg.shape[0])
        if row_split:   # TP pieces side by side on dim 1, every piece holds all rows
            lc = metas[0].shape[1]
            cols = idx[1] if idx[1] is not None else torch.arange(tg.shape[1])
            for i, r in enumerate(ranks):
                pos = ((cols // lc) == i).nonzero().flatten()
                if len(pos):
                    piece = self._mapped(r, mk)
                    _into(out, 1, pos, lambda dst: copy_rows(piece, code[rows, i] & _MASK,
                                                             [cols[pos] % lc, *idx[2:]], dst))
        else:           # each row from the piece holding it
            c = code[rows, 0]
            which, local = c >> _CODE, c & _MASK
            for i, r in enumerate(ranks):
                pos = (which == i).nonzero().flatten()
                if len(pos):
                    piece = self._mapped(r, mk)
                    _into(out, 0, pos, lambda dst: copy_rows(piece, local[pos], idx[1:], dst))
        tg.filled = True

    def close(self):
        self.src.close()
        for h in self.handles.values():
            h.close()


# ------------------------------------------------------------------------------------ MindSpeed DCP
class _DcpRelease:
    """MindSpeed-MM DCP (``hf_to_dcp``): one entry at a time through the keymap's ``dcp_to_model``."""

    def __init__(self, path, family, hf: nn.Module):
        import importlib

        from omnitune.convert.dcp import DcpSource

        pkg = type(family).__module__.rsplit(".", 1)[0]
        self.fn = getattr(importlib.import_module(pkg + ".keymap"), "dcp_to_model", None)
        if self.fn is None:
            raise ConfigError(f"--load {path}: a DCP checkpoint of family {family.name!r} cannot be read "
                              f"({pkg}.keymap has no dcp_to_model); load an HF or mm folder instead")
        self.path = path
        self.whole: list[str] = []
        self._files: dict[str, object] = {}
        self.src = DcpSource(Path(path), "--load")
        text = family.text_config(hf.config)
        self.experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)

    def fill(self, targets: dict[str, _Target]) -> None:
        shapes = {n: tg.shape for n, tg in targets.items()}
        for name in self.src.names:
            hit = self.fn(name, self.src.meta(name), self.experts, shapes)
            if hit is None:
                continue
            if hit[0] not in targets:
                raise ConfigError(f"--load {self.path}: DCP entry {name!r} has no place in the model ({hit[0]!r})")
            targets[hit[0]].fill(self._source(name, shapes), f"--load {self.path}: {name!r}")

    def _source(self, name: str, shapes):
        """The entry after ``dcp_to_model`` as a :class:`_Mapped` when it is one saved chunk (as
        ``hf_to_dcp`` writes) and the keymap's transform is a view (reshape / transpose): the
        entry's ``torch.save`` record is located inside the .distcp file from its header alone
        (``skip_data``) and the transform is applied to a meta view of it. Else read whole."""
        idx, fqn = self.src.idx, self.src.names[name]
        md = idx.md.state_dict_metadata[fqn]
        parts = idx.chunks[fqn]
        info = parts[0][1]
        if len(parts) == 1 and not any(parts[0][0] or ()) and not getattr(info, "transform_descriptors", None):
            f = self._files.get(info.relative_path)
            if f is None:
                f = self._files[info.relative_path] = open(idx.folder / info.relative_path, "rb")
            with torch.serialization.skip_data():
                meta = torch.load(_FileSlice(f, info.offset, info.length), map_location="meta", weights_only=True)
            recs = [r for r in torch._C.PyTorchFileReader(_FileSlice(f, info.offset, info.length)).get_all_records()
                    if r.startswith("data/")]
            if isinstance(meta, torch.Tensor) and tuple(meta.shape) == tuple(md.size) and len(recs) == 1:
                view = self.fn(name, meta, self.experts, shapes)[1]
                if view is meta or view._base is meta:
                    reader = torch._C.PyTorchFileReader(_FileSlice(f, info.offset, info.length))
                    return _Mapped.of_view(f, info.offset + reader.get_record_offset(recs[0]), view)
        self.whole.append(name)
        return self.fn(name, self.src.read(name), self.experts, shapes)[1]

    def close(self):
        for f in self._files.values():
            f.close()


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable read-only file."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.off, self.n, self.pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: pos, io.SEEK_CUR: self.pos + pos, io.SEEK_END: self.n + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        k = max(0, min(len(b), self.n - self.pos))
        got = os.preadv(self.f.fileno(), [memoryview(b)[:k]], self.off + self.pos) if k else 0
        self.pos += got
        return got


def _load_training_dcp(path, hf: nn.Module, targets: dict[str, _Target]) -> None:
    """omnitune's own checkpoint: DCP reads only the chunks overlapping this rank's shards (through
    checkpoint.safe_dcp: no code from the folder; a bad file is named)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from omnitune.checkpoint import dcp as ckpt_io
    from omnitune.checkpoint import safe_dcp

    p = Path(path)
    ckpt = p if (p / ".metadata").is_file() else ckpt_io.resolve_checkpoint(p)
    sd = ckpt_io.model_state(hf)              # a tied weight once (its alias: filled below)
    todo = ckpt_io.strided_placeholders(sd)   # TP's fused qkv: read whole, sliced after
    try:
        safe_dcp.load({"model": sd}, ckpt)
    except safe_dcp.CheckpointError as e:
        raise safe_dcp.CheckpointError(f"--load {path}: {e}") from None
    ckpt_io.fill_strided(todo)
    sd = ckpt_io.with_aliases(hf, sd)
    set_model_state_dict(hf, sd)
    for name in sd:
        if name in targets:
            targets[name].filled = True


# ------------------------------------------------------------------------------------ buffers
def recreate_non_persistent_buffers(hf: nn.Module) -> list[str]:
    """Recompute every non-persistent buffer (empty after ``to_empty``) with the HF model's own
    ``_init_weights`` for its module, as ``from_pretrained`` does (rotary ``inv_freq`` /
    ``original_inv_freq``, sinusoid position tables). Own parameters of such a module are kept.
    Raises if a buffer is left unwritten."""
    from transformers import PreTrainedModel

    owners = {n: m for n, m in hf.named_modules() if isinstance(m, PreTrainedModel)}
    done = []
    with torch.no_grad():
        for name, mod in hf.named_modules():
            bufs = [b for b in mod._non_persistent_buffers_set if mod._buffers.get(b) is not None]
            if not bufs:
                continue
            parts = name.split(".") if name else []
            owner = next(owners[p] for p in (".".join(parts[:i]) for i in range(len(parts), -1, -1)) if p in owners)
            before = {b: mod._buffers[b]._version for b in bufs}
            kept = [(p, _local(p).clone()) for p in mod.parameters(recurse=False)]
            owner._init_weights(mod)
            for p, v in kept:
                _local(p).copy_(v)
            for b in bufs:
                if mod._buffers[b]._version == before[b]:
                    raise ConfigError(f"--init-model-with-meta-device: buffer {name}.{b} of {type(mod).__name__} is "
                                      f"not saved in checkpoints and {type(owner).__name__}._init_weights does not "
                                      f"compute it; this model cannot be built on the meta device")
                done.append(f"{name}.{b}" if name else b)
    return done


# ------------------------------------------------------------------------------------ entry point
@dataclass
class LoadReport:
    kind: Optional[str]
    path: Optional[str]
    loaded: int = 0                      # distinct tensors filled from the source
    buffers: list[str] = field(default_factory=list)    # non-persistent buffers recomputed
    zeroed_unused: list[str] = field(default_factory=list)  # unused parameters the source lacks
    tied_by_value: list[str] = field(default_factory=list)
    #: source tensors read or built whole before slicing (converter targets, DCP release entries,
    #: mm tensors whose keymap op is not a row permutation); everything else is read box by box
    built_whole: list[str] = field(default_factory=list)

    def describe(self) -> str:
        s = (f"meta init  : {self.loaded} tensors from {self.kind} {self.path}, "
             f"{len(self.buffers)} non-persistent buffers recomputed")
        if self.zeroed_unused:
            s += f", unused and absent (zeros): {', '.join(self.zeroed_unused)}"
        return s


def _shared_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [g for g in by_id.values() if len(g) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """``to_empty`` makes one new tensor per module, which unties a shared parameter of modules
    FSDP2 does not manage (FSDP2 itself re-shares its parameters): share them again."""
    for names in groups:
        first = model.get_parameter(names[0])
        for n in names[1:]:
            if model.get_parameter(n) is first:
                continue
            if hasattr(first, "_local_tensor"):
                raise RuntimeError(f"parameters {names} were one tensor before materialising and are not after")
            owner, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(owner), leaf, first)


def _source_for(kind: str, path, family, hf, targets):
    if kind == "hf":
        return _HfFolder(path, family, hf)
    if is_dcp_release(path):
        return _DcpRelease(path, family, hf)
    return _MmFolder(path, family, hf, targets)


def materialize_and_load(train_model: nn.Module, family, source_kind: Optional[str], path=None,
                         device: torch.device | str | None = None) -> LoadReport:
    """Materialise ``train_model`` (a :class:`TrainModel` or an HF model, built on meta and already
    sharded) on ``device`` and fill each rank's shards from ``path``.

    source_kind: "hf" (safetensors folder; Omni: the full folder, thinker.* only), "mm" (Megatron
    folder or MindSpeed-MM DCP release, as ``--load`` detects them), "resume" (omnitune training
    checkpoint, root or iteration folder: its model weights), "dcp" (either DCP kind, detected), or
    None (materialise and recompute buffers only; the caller fills every parameter, e.g.
    ``checkpoint.dcp.load_checkpoint`` on resume). Collective for training checkpoints (DCP); the
    other kinds only read files.
    """
    if source_kind is not None and source_kind not in KINDS:
        raise ValueError(f"source_kind {source_kind!r}: one of {KINDS} or None")
    hf = getattr(train_model, "hf", train_model)
    if not all(t.is_meta for t in train_model.parameters()):
        raise ValueError("materialize_and_load: the model is not (entirely) on the meta device; build it with "
                         "train.model.build_meta_model")
    device = torch.device(device) if device is not None else torch.device("cpu")
    ties = _shared_groups(train_model)
    train_model.to_empty(device=device)
    _retie(train_model, ties)
    report = LoadReport(source_kind, str(path) if path is not None else None)
    with torch.no_grad():
        report.buffers = recreate_non_persistent_buffers(hf)
        if source_kind is None:
            return report
        targets = _targets(hf)
        if source_kind == "resume" or (source_kind == "dcp" and not is_dcp_release(path)):
            _load_training_dcp(path, hf, targets)
        else:
            src = _source_for(source_kind, path, family, hf, targets)
            try:
                src.fill(targets)
            finally:
                src.close()
            report.built_whole = list(src.whole)
        _finish(hf, family, targets, report, source_kind, path)
    return report


def _finish(hf, family, targets, report: LoadReport, kind, path) -> None:
    """Ties, unused parameters, and the check that nothing is left as ``to_empty`` garbage."""
    for tgt, src in (getattr(hf, "all_tied_weights_keys", None) or {}).items():
        a, b = targets.get(tgt), targets.get(src)
        if a is None or b is None or a is b:
            continue     # one shared parameter (FSDP2 keeps ties): filled once
        if not b.filled:
            continue
        if getattr(a.tensor, "placements", None) != getattr(b.tensor, "placements", None) or \
                a.local.shape != b.local.shape:
            raise ConfigError(f"tied weights {tgt} and {src} were given different layouts by the parallel plans; "
                              f"they cannot be tied after loading")
        a.local.copy_(b.local)
        a.filled = True
        report.tied_by_value.append(tgt)
    unused = {id(p) for p in family.unused_parameters(hf)}
    missing = []
    for tg in _unique(targets):
        if tg.filled:
            continue
        if id(tg.tensor) in unused:
            tg.local.zero_()
            tg.filled = True
            report.zeroed_unused.append(tg.names[0])
        else:
            missing.append(tg.names[0])
    if missing:
        raise ConfigError(f"--load {path}: the {kind} checkpoint does not hold {len(missing)} weights of the model "
                          f"(e.g. {missing[:5]})")
    report.loaded = sum(1 for _ in _unique(targets)) - len(report.zeroed_unused)
