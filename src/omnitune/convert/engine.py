"""Streaming HF <-> mm conversion, family-agnostic.

Every conversion is a flow of *groups* of full (unsplit) mm tensors: a group is one layer of one
module (``text_decoder.decoder.layers.7``) or one non-layer weight. A source yields them, a sink
consumes them; at most one group's tensors (plus its TP shards) are alive at a time.

- :class:`HfSource`: HF ``*.safetensors`` -> mm groups through the family keymap's ``hf_to_mm``.
- :class:`MmSource`: an mm folder (any TP/PP/VPP) -> mm groups (stages and TP ranks merged).
- :class:`MmSink`: mm groups -> the Megatron folder (TP split, stage placement), one streamed
  ``model_optim_rng.pt`` per rank.
- :class:`HfSink`: mm groups -> HF safetensors in the source folder's file layout (``mm_to_hf``).

Both sides first *plan* from meta tensors (shapes and dtypes, no data), so every output file's
header is written before any tensor data and a bad layout is refused before anything is written.

A family keymap module (``omnitune.models.<family>.keymap``) provides: ``Sizes.from_config(dict)``,
``sizes_from_layout(parallel)``, ``modules(sizes)``, ``tp_rule(mm_key)``, ``tp_divisibility(sizes)``,
``hf_to_mm(hf_sd, sizes, pp_size)``, ``mm_to_hf(mm_sd, sizes)``, ``normalize_hf_keys(sd)``,
``denormalize_hf_key(key)``, ``OUTPUT_LAYER``, ``WORD_EMBEDDINGS`` and optionally
``is_mm_hf_key(hf_key)`` (weights of the HF folder the mm checkpoint holds; default all).
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

from omnitune.convert import layout as L
from omnitune.convert.stream import PtIndex, PtWriter, SafetensorsIndex, SafetensorsWriter, Scratch
from omnitune.fsutil import atomic_dir

_LAYER = re.compile(r"^(.*?\.\d+)\.")


def group_of(key: str) -> str:
    """'text_decoder.decoder.layers.3.mlp.x' -> 'text_decoder.decoder.layers.3'; else the key itself."""
    m = _LAYER.match(key)
    return m[1] if m else key


def release_memory_eagerly() -> None:
    """Tune glibc malloc for the converters' pattern: the same few layer-sized buffers (fusions,
    TP shard copies) allocated and freed once per layer.

    Input tensors are mapped files (stream._pread_tensor), not heap memory, so what is left on the
    heap is small and repeats layer after layer. Every buffer comes from the heap (M_MMAP_MAX=0: no
    per-buffer mmap, whose fresh pages the kernel must fault in and zero each time - on a VM that
    costs more than the copy itself) and up to 256 MiB of freed heap top is kept for the next layer
    (M_TRIM_THRESHOLD) instead of being returned to the OS and faulted in again. Measured on the
    Qwen2-VL-2B bench: hf_to_mm CPU -20%, peak RSS +0.1 GiB (well inside the budget).
    """
    import ctypes
    import ctypes.util
    import os

    # torch's CPU allocator backs large tensors with transparent huge pages when this is set (read on
    # its first large allocation): fewer page faults for the heap as it grows.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                mininterval=1.0, leave=False)


def _nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def is_mm_hf_key(km: ModuleType, key: str) -> bool:
    fn = getattr(km, "is_mm_hf_key", None)
    return True if fn is None else fn(key)


# ------------------------------------------------------------------------------------ sources
class HfSource:
    """The mm groups of an HF folder; only the HF tensors of one group are read at a time."""

    def __init__(self, hf_dir: Path, km: ModuleType, sizes, pp_size: int):
        self.idx = SafetensorsIndex(hf_dir)
        self.km, self.sizes, self.pp_size = km, sizes, pp_size
        self.hf_groups: dict[str, list[str]] = {}
        for k in self.idx.keys():
            if is_mm_hf_key(km, k):
                self.hf_groups.setdefault(group_of(k), []).append(k)

    def _convert(self, sd: dict) -> dict:
        return self.km.hf_to_mm(sd, self.sizes, self.pp_size)

    def plan(self) -> list[tuple[str, dict]]:
        return [(g, self._convert({k: self.idx.meta(k) for k in keys})) for g, keys in self.hf_groups.items()]

    def read(self, group: str) -> dict:
        return self._convert({k: self.idx.read(k) for k in self.hf_groups[group]})

    def close(self):
        self.idx.close()


class MmSource:
    """The mm groups of a Megatron folder laid out as ``parallel``; each group is read from the TP
    rank files of the stage that holds it and merged."""

    def __init__(self, mm_dir: Path, parallel: L.ParallelConfig, modules: list[L.ModuleSchema],
                 km: ModuleType, field_name: str):
        self.par, self.mods, self.km = parallel, modules, km
        it_dir = L.mm_iteration_dir(mm_dir, field_name)
        pp, vpp = parallel.pp_size, parallel.vpp_size
        self.files: dict[tuple[int, int], PtIndex] = {}
        # (tp_rank, global key) -> (file, path inside the file); per rank meta
        self.loc: dict[tuple[int, str], tuple[tuple[int, int], tuple]] = {}
        metas: list[dict[str, torch.Tensor]] = []
        for tp_rank in range(parallel.max_tp):
            meta: dict[str, torch.Tensor] = {}
            for pp_rank in range(pp):
                f = it_dir / L.rank_dir_name(tp_rank, pp_rank, pp) / L.CKPT_NAME
                if not f.is_file():
                    raise L.ConvertError(f"{field_name}={mm_dir}: {f} is missing; does the parallel config "
                                         f"(tp_size={parallel.max_tp}, pp_size={pp}) match the checkpoint?")
                try:
                    ix = PtIndex(f)
                except Exception as e:  # noqa: BLE001 - unreadable: say which file and why
                    raise L.ConvertError(f"{f}: cannot be read with torch.load(weights_only=True): "
                                         f"{str(e).splitlines()[0]}") from e
                self.files[(tp_rank, pp_rank)] = ix
                for v in range(vpp):
                    name = f"model{v}" if vpp > 1 else "model"
                    if name not in ix.content:
                        raise L.ConvertError(f"{f} has no {name!r} entry (has {sorted(ix.content)}); does the VPP "
                                             f"layout ({vpp} chunks) match the checkpoint?")
                    stage = v * pp + pp_rank
                    for key, t in ix.content[name].items():
                        if not isinstance(t, torch.Tensor) or key.endswith("._extra_state"):
                            continue
                        gkey = self._globalize(key, stage)
                        if gkey in meta:
                            continue  # the same weight on two stages (kept from the first)
                        meta[gkey] = t
                        self.loc[(tp_rank, gkey)] = ((tp_rank, pp_rank), (name, key))
            metas.append(meta)
        extra = it_dir / L.rank_dir_name(parallel.max_tp, 0, pp)
        if extra.exists():
            raise L.ConvertError(f"{field_name}={mm_dir}: {extra.name} exists, so the checkpoint has more TP ranks "
                                 f"than the given tp size {parallel.max_tp}")
        keys = list(metas[0])
        for r, m in enumerate(metas[1:], 1):
            if set(m) != set(keys):
                diff = sorted(set(m) ^ set(keys))[:5]
                raise L.ConvertError(f"{field_name}: TP rank {r} does not hold the same weights as rank 0 (e.g. {diff})")
        self.metas = metas
        self.groups: dict[str, list[str]] = {}
        for k in keys:
            self.groups.setdefault(group_of(k), []).append(k)

    def _globalize(self, key: str, stage: int) -> str:
        for m in self.mods:
            if key.startswith(m.layer_prefix):
                idx_s, rest = key[len(m.layer_prefix):].split(".", 1)
                a, b = L.stage_ranges(getattr(self.par, m.pp_field))[stage]
                idx = int(idx_s) + a
                if idx >= b:
                    raise L.ConvertError(f"stage {stage} holds {key!r}, but {m.pp_field}="
                                         f"{getattr(self.par, m.pp_field)} gives that stage only {b - a} layers")
                return f"{m.layer_prefix}{idx}.{rest}"
        return key

    def _merge(self, per_rank: list[dict]) -> dict:
        return L.merge_tp(per_rank, self.par, self.mods, self.km.tp_rule)

    def plan(self) -> list[tuple[str, dict]]:
        return [(g, self._merge([{k: m[k] for k in keys} for m in self.metas])) for g, keys in self.groups.items()]

    def read(self, group: str) -> dict:
        per_rank = []
        for r in range(self.par.max_tp):
            sd = {}
            for k in self.groups[group]:
                f, path = self.loc[(r, k)]
                sd[k] = self.files[f].read(path)
            per_rank.append(sd)
        return self._merge(per_rank)

    def close(self):
        for ix in self.files.values():
            ix.close()


# ------------------------------------------------------------------------------------ sinks
def _stage_of_key(parts: list[dict]) -> int:
    return min((s for s, sd in enumerate(parts) if sd), default=0)


class MmSink:
    """Writes mm groups into the Megatron layout of ``parallel`` (call ``plan`` once, then ``write``
    every planned group, then ``close`` inside an atomic folder)."""

    def __init__(self, parallel: L.ParallelConfig, modules: list[L.ModuleSchema], km: ModuleType):
        self.par, self.mods, self.km = parallel, modules, km

    def _split(self, group_sd: dict, views: bool = False) -> list[list[dict]]:
        """-> [tp_rank][stage] {local key: tensor}; views: GLU shards as uncopied views (for write)"""
        return [L.partition_stages(sd, self.par, self.mods)
                for sd in L.split_tp(group_sd, self.par, self.mods, self.km.tp_rule, views=views)]

    def plan(self, groups: list[tuple[str, dict]]) -> list[str]:
        """Returns the group order writes must follow (stage by stage, so every file's storages are
        written in the order torch.save would write them)."""
        placed = []
        for i, (g, sd) in enumerate(groups):
            parts = self._split(sd)
            placed.append((_stage_of_key(parts[0]), i, g, parts))
        placed.sort(key=lambda x: (x[0], x[1]))
        pp, vpp = self.par.pp_size, self.par.vpp_size
        self.structs = {(r, p): {**{(f"model{v}" if vpp > 1 else "model"): {} for v in range(vpp)},
                                 "checkpoint_version": L.CHECKPOINT_VERSION}
                        for r in range(self.par.max_tp) for p in range(pp)}
        for _, _, g, parts in placed:
            for r, stages in enumerate(parts):
                for s, sd in enumerate(stages):
                    name = f"model{s // pp}" if vpp > 1 else "model"
                    self.structs[(r, s % pp)][name].update(sd)
        self.bytes = sum(_nbytes(sd) for _, sd in groups)
        return [g for _, _, g, _ in placed]

    def open(self, root: Path, iteration: str = "release") -> None:
        pp = self.par.pp_size
        self.root, self.iteration = root, iteration
        self.writers = {}
        scratch = Scratch()  # one reused buffer for every non-contiguous shard (row splits, GLU)
        for (r, p), struct in self.structs.items():
            d = root / iteration / L.rank_dir_name(r, p, pp)
            d.mkdir(parents=True)
            self.writers[(r, p)] = PtWriter(d / L.CKPT_NAME, struct, scratch=scratch)

    def write(self, group_sd: dict) -> None:
        pp, vpp = self.par.pp_size, self.par.vpp_size
        for r, stages in enumerate(self._split(group_sd, views=True)):
            for s, sd in enumerate(stages):
                name = f"model{s // pp}" if vpp > 1 else "model"
                w = self.writers[(r, s % pp)]
                for k, t in sd.items():
                    w.write((name, k), t)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        (self.root / L.LATEST_TXT).write_text(self.iteration)


def run_to_mm(source, sink: MmSink, out_dir: Path, desc: str, extra=None) -> None:
    """Plan (meta), then stream every group from source to sink inside a temp folder renamed at the end.
    ``extra(group_sd)``: optional in-place fix-up of a group (e.g. the tied output_layer copy)."""
    release_memory_eagerly()
    planned = source.plan()
    if extra is not None:
        planned = [(g, extra(sd)) for g, sd in planned]
    order = sink.plan(planned)
    bar = _progress(sink.bytes, desc)
    try:
        with atomic_dir(out_dir) as tmp:
            sink.open(tmp)
            for g in order:
                with L.lazy_row_cat():  # fused weights are written piece by piece from the inputs
                    sd = source.read(g)
                    if extra is not None:
                        sd = extra(sd)
                    sink.write(sd)
                bar.update(_nbytes(sd))
                del sd
            sink.close()
    finally:
        bar.close()
        source.close()


# ------------------------------------------------------------------------------------ mm -> HF
def _hf_plan(source: MmSource, km: ModuleType, sizes) -> tuple[list[tuple[str, dict]], dict[str, torch.Tensor]]:
    """[(group, {hf legacy key: meta})], and all HF legacy keys -> meta."""
    out, every = [], {}
    for g, sd in source.plan():
        hf = km.mm_to_hf(sd, sizes)
        out.append((g, hf))
        every.update(hf)
    return out, every


def iter_hf_groups(source: MmSource, km: ModuleType, sizes) -> Iterator[dict]:
    """HF tensors (legacy names), one group at a time."""
    for g in source.groups:
        yield km.mm_to_hf(source.read(g), sizes)


def mm_to_hf(source: MmSource, km: ModuleType, sizes, hf_dir: Path, save_dir: Path, field_mm: str) -> None:
    """Stream an mm folder into HF safetensors laid out like hf_dir (same files, same keys), plus every
    non-weight file of hf_dir and its weights the mm checkpoint does not hold (e.g. Omni's talker)."""
    release_memory_eagerly()
    src = SafetensorsIndex(hf_dir)
    try:
        _, new_style = km.normalize_hf_keys(dict.fromkeys(k for k in src.keys() if is_mm_hf_key(km, k)))
        to_folder = getattr(km, "to_folder_key", None)
        if to_folder is not None:
            def name(k, _f=to_folder, _n=new_style):
                return _f(k, _n)
        else:
            name = km.denormalize_hf_key if new_style else (lambda k: k)
        groups, every = _hf_plan(source, km, sizes)
        produced = {name(k): t for k, t in every.items()}
        wanted = {k for k in src.keys() if is_mm_hf_key(km, k)}
        lm_head = [k for k in produced if k not in wanted and k.endswith("lm_head.weight")]
        for k in lm_head:  # tied: the HF folder stores only the embedding
            produced.pop(k)
        missing, extra = sorted(wanted - set(produced)), sorted(set(produced) - wanted)
        if missing or extra:
            raise L.ConvertError(f"{field_mm} does not match hf_config.hf_dir={hf_dir}: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
        plans = {}
        for fname, keys in src.file_keys.items():
            plans[fname] = {k: (produced[k] if k in produced else src.meta(k)) for k in keys}
        total = sum(_nbytes(p) for p in plans.values())
        bar = _progress(total, "mm_to_hf")
        try:
            with atomic_dir(save_dir) as tmp:
                _copy_non_weights(Path(hf_dir), tmp)
                writers = {f: SafetensorsWriter(tmp / f, p, src.file_meta.get(f) or {"format": "pt"})
                           for f, p in plans.items()}
                for g, _ in groups:
                    for k, t in km.mm_to_hf(source.read(g), sizes).items():
                        k = name(k)
                        if k in produced:
                            writers[src.file_of(k)].write(k, t)
                            bar.update(t.numel() * t.element_size())
                for k in src.keys():
                    if k not in produced:
                        writers[src.file_of(k)].write(k, src.read(k))
                        bar.update(src.nbytes(k))
                for w in writers.values():
                    w.close()
        finally:
            bar.close()
    finally:
        src.close()
        source.close()


def _copy_non_weights(src_dir: Path, dst: Path) -> None:
    for item in src_dir.rglob("*"):
        if item.is_file() and item.suffix != ".safetensors":
            out = dst / item.relative_to(src_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, out)


# ------------------------------------------------------------------------------------ layout detection
def detect_layout(mm_dir: Path, modules: list[L.ModuleSchema], km: ModuleType, sizes,
                  full_meta: Optional[dict] = None) -> L.ParallelConfig:
    """The ParallelConfig of an mm folder, read from its rank folders and weights.

    TP size = number of ``mp_rank_XX`` folders; PP from the ``_PPP`` suffixes; VPP from the
    ``model0..`` entries; layers per stage by counting layer indices. Per-module TP (hetero) from the
    shard shapes against ``full_meta`` (the full mm meta state dict) when given.
    """
    it_dir = L.mm_iteration_dir(mm_dir, "--load")
    names = sorted(p.name for p in it_dir.iterdir() if p.is_dir() and p.name.startswith("mp_rank_"))
    if not names:
        raise L.ConvertError(f"--load {mm_dir}: {it_dir} has no mp_rank_* folders")
    tps, pps = set(), set()
    for n in names:
        parts = n.split("_")[2:]
        tps.add(int(parts[0]))
        pps.add(int(parts[1]) if len(parts) > 1 else 0)
    tp, pp = max(tps) + 1, max(pps) + 1
    stages_keys: list[list[list[str]]] = []
    meta0: dict[str, torch.Tensor] = {}  # rank 0's weights, layer index replaced by 0
    vpp = None
    for p in range(pp):
        ix = PtIndex(it_dir / L.rank_dir_name(0, p, pp) / L.CKPT_NAME)
        chunks = sorted((k for k in ix.content if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))
        if not chunks:
            raise L.ConvertError(f"--load {mm_dir}: {ix.path} holds no 'model' entry")
        if vpp is None:
            vpp = len(chunks)
        stages_keys.append([list(ix.content[c]) for c in chunks])
        for c in chunks:
            for k, t in ix.content[c].items():
                if isinstance(t, torch.Tensor):
                    meta0.setdefault(_layer0(k, modules), t)
    layers: dict[str, list[list[int]]] = {}
    for m in modules:
        grid = [[0] * pp for _ in range(vpp)]
        for p in range(pp):
            for v in range(vpp):
                idx = {k[len(m.layer_prefix):].split(".", 1)[0] for k in stages_keys[p][v] if k.startswith(m.layer_prefix)}
                grid[v][p] = len(idx)
        layers[m.pp_field] = grid
    tp_sizes = {"tp_size": tp}
    if full_meta is not None and tp > 1:
        full0 = {_layer0(k, modules): t for k, t in full_meta.items()}
        for m in modules:
            if m.tp_field == "tp_size":
                continue
            for k, t in meta0.items():
                if k.startswith(m.key_prefix) and km.tp_rule(k) in ("column", "glu") and k in full0:
                    ratio = full0[k].shape[0] // max(t.shape[0], 1)
                    if ratio != tp:
                        tp_sizes[m.tp_field] = ratio
                    break
    return L.ParallelConfig(**layers, **tp_sizes)


def _layer0(key: str, modules: list[L.ModuleSchema]) -> str:
    for m in modules:
        if key.startswith(m.layer_prefix):
            return m.layer_prefix + "0." + key[len(m.layer_prefix):].split(".", 1)[1]
    return key
