"""Family-agnostic machinery of ``mm-convert``.

- ``ParallelConfig``: the pydantic model behind ``--cfg.parallel_config.*`` (and the
  ``source_/target_parallel_config`` of resplit) with its own validation.
- ``ModuleSchema`` + ``partition_stages`` / ``merge_stages``: place a module's layers on pipeline
  stages (lists flattened chunk-major, stage = vpp_idx * pp_size + pp_rank, indices restart at 0).
- TP split/merge helpers (column = dim 0, row = dim 1, GLU = [gate shard; up shard]) and the
  qkv interleave helpers used by family keymaps.
- The Megatron "mm" folder names: ``<dir>/latest_checkpointed_iteration.txt`` and
  ``<dir>/release/mp_rank_XX[_PPP]/model_optim_rng.pt`` (read and written, streamed, by ``engine``).

What a weight is called, whether it fuses and how it splits is family knowledge: it lives in
``omnitune.models.<family>.keymap``, never here.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, model_validator

LATEST_TXT = "latest_checkpointed_iteration.txt"
CKPT_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0

StateDict = dict[str, torch.Tensor]
Layers = Union[list[list[NonNegativeInt]], list[NonNegativeInt]]


class ConvertError(ValueError):
    """A bad mm-convert input, raised before anything is written. The message names the field."""


# ---------------------------------------------------------------------------------- configs
class ParallelConfig(BaseModel):
    """Layer placement and tensor parallel sizes of an mm checkpoint.

    *_pp_layers: outer list = virtual pipeline chunk, inner list = layers per PP rank. A flat list
    (as mm_to_hf / resplit take it) is one chunk.
    """
    model_config = ConfigDict(extra="forbid")

    llm_pp_layers: Layers
    """LLM layers per pipeline stage, e.g. [[1,10,10,7]] or [1,10,10,7]"""
    vit_pp_layers: Layers
    """vision layers per pipeline stage, same shape as llm_pp_layers"""
    audio_pp_layers: Optional[Layers] = None
    """audio layers per pipeline stage (audio families only)"""
    tp_size: PositiveInt = 1
    """tensor parallel size (default for every module)"""
    vit_tp_size: NonNegativeInt = 0
    """vision tensor parallel size for hetero parallel; 0 = tp_size"""
    audio_tp_size: NonNegativeInt = 0
    """audio tensor parallel size for hetero parallel; 0 = tp_size"""
    audio_tp_layers: Optional[NonNegativeInt] = None
    """alias of audio_tp_size (spelling used by the Qwen2.5-Omni seed command)"""

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for name in ("llm_pp_layers", "vit_pp_layers", "audio_pp_layers"):
                v = data.get(name)
                if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
                    data[name] = [list(v)]
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.audio_tp_layers is not None:
            if self.audio_tp_size not in (0, self.audio_tp_layers):
                raise ValueError("parallel_config.audio_tp_layers is an alias of audio_tp_size; give only one")
            self.audio_tp_size = self.audio_tp_layers
            self.audio_tp_layers = None
        ref = self.llm_pp_layers
        if not ref or not ref[0]:
            raise ValueError("parallel_config.llm_pp_layers: needs at least one stage, e.g. [[28]]")
        for name in ("llm_pp_layers", "vit_pp_layers", "audio_pp_layers"):
            v = getattr(self, name)
            if v is None:
                continue
            if any(len(chunk) != len(v[0]) for chunk in v):
                raise ValueError(f"parallel_config.{name}: every VPP chunk must list the same number of "
                                 f"PP ranks, got {v}")
            if len(v) != len(ref) or len(v[0]) != len(ref[0]):
                raise ValueError(f"parallel_config.{name} {v} must have the same shape (VPP chunks x PP "
                                 f"ranks) as llm_pp_layers {ref}")
        return self

    @property
    def pp_size(self) -> int:
        return len(self.llm_pp_layers[0])

    @property
    def vpp_size(self) -> int:
        return len(self.llm_pp_layers)

    @property
    def num_stages(self) -> int:
        return self.pp_size * self.vpp_size

    def module_tp(self, tp_field: str) -> int:
        v = getattr(self, tp_field)
        return v or self.tp_size

    @property
    def max_tp(self) -> int:
        return max(self.tp_size, self.vit_tp_size, self.audio_tp_size)


def flat(layers: list[list[int]]) -> list[int]:
    """Chunk-major flattening: stage s = vpp_idx * pp_size + pp_rank."""
    return [n for chunk in layers for n in chunk]


def stage_ranges(layers: list[list[int]]) -> list[tuple[int, int]]:
    """[start, end) of the global layer indices held by each stage."""
    out, start = [], 0
    for n in flat(layers):
        out.append((start, start + n))
        start += n
    return out


# ---------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class ModuleSchema:
    """How one module (vision, audio, LLM) of a family is laid out in the mm state dict."""
    name: str                       # human name for messages
    pp_field: str                   # ParallelConfig field with its layer placement
    tp_field: str                   # ParallelConfig field with its TP size
    key_prefix: str                 # every key of the module starts with this
    layer_prefix: str               # "<prefix>{i}.<rest>"
    firsts: tuple[str, ...] = ()    # keys on the first stage that holds layers of the module
    lasts: tuple[str, ...] = ()     # keys on the last such stage
    num_layers: int = 0
    extra: dict = field(default_factory=dict)


def validate_layout(parallel: ParallelConfig, modules: list[ModuleSchema], field_prefix: str = "parallel_config",
                    divisible: Optional[list[tuple[str, int, str]]] = None) -> None:
    """Raise ConvertError naming the field if the layout cannot hold the model.

    divisible: (tp_field, count, what) - e.g. ("tp_size", num_key_value_heads, "num_key_value_heads").
    """
    for tp_field, count, what in divisible or []:
        tp = parallel.module_tp(tp_field)
        if count % tp:
            raise ConvertError(f"{field_prefix}.{tp_field}={tp}: {what}={count} is not divisible by it")
    if parallel.max_tp % parallel.tp_size or any(
            t and parallel.max_tp % t for t in (parallel.vit_tp_size, parallel.audio_tp_size)):
        raise ConvertError(f"{field_prefix}: the TP sizes (tp_size={parallel.tp_size}, vit_tp_size="
                           f"{parallel.vit_tp_size}, audio_tp_size={parallel.audio_tp_size}) must all divide the largest")
    for m in modules:
        layers = getattr(parallel, m.pp_field)
        if layers is None:
            raise ConvertError(f"{field_prefix}.{m.pp_field} is required: the model has {m.num_layers} {m.name} layers")
        if sum(flat(layers)) != m.num_layers:
            raise ConvertError(f"{field_prefix}.{m.pp_field}={layers} sums to {sum(flat(layers))}, but the model has "
                               f"{m.num_layers} {m.name} layers")
    # encoders must run before the LLM: every encoder stage index <= the first LLM stage
    llm = [m for m in modules if m.pp_field == "llm_pp_layers"]
    if llm:
        llm_flat = flat(parallel.llm_pp_layers)
        first_llm = next((i for i, n in enumerate(llm_flat) if n), 0)
        for m in modules:
            if m.pp_field == "llm_pp_layers":
                continue
            mflat = flat(getattr(parallel, m.pp_field))
            used = [i for i, n in enumerate(mflat) if n]
            if used and used[-1] > first_llm:
                raise ConvertError(
                    f"{field_prefix}.{m.pp_field}={getattr(parallel, m.pp_field)}: {m.name} layers are placed on "
                    f"stage {used[-1]}, after the first LLM stage {first_llm} of llm_pp_layers="
                    f"{parallel.llm_pp_layers}; all {m.name} layers must come at or before the first LLM layer's stage")


def _stage_of(layers: list[list[int]]) -> tuple[int, int]:
    """(first, last) stage that holds layers (0, 0 when the module has none)."""
    used = [i for i, n in enumerate(flat(layers)) if n]
    return (used[0], used[-1]) if used else (0, 0)


def partition_stages(sd: StateDict, parallel: ParallelConfig, modules: list[ModuleSchema]) -> list[StateDict]:
    """Full (one TP rank) state dict -> one state dict per stage with per-stage layer indices."""
    n = parallel.num_stages
    stages: list[StateDict] = [{} for _ in range(n)]
    for key, value in sd.items():
        m = next((m for m in modules if key.startswith(m.key_prefix)), None)
        if m is None:
            raise ConvertError(f"weight {key!r} belongs to no module of this family")
        layers = getattr(parallel, m.pp_field)
        if key.startswith(m.layer_prefix):
            idx_s, rest = key[len(m.layer_prefix):].split(".", 1)
            idx = int(idx_s)
            for s, (a, b) in enumerate(stage_ranges(layers)):
                if a <= idx < b:
                    stages[s][f"{m.layer_prefix}{idx - a}.{rest}"] = value
                    break
            else:
                raise ConvertError(f"weight {key!r}: layer {idx} is beyond {m.pp_field}={layers}")
            continue
        first, last = _stage_of(layers)
        if any(key.startswith(p) for p in m.lasts):
            stages[last][key] = value
        elif any(key.startswith(p) for p in m.firsts):
            stages[first][key] = value
        else:
            raise ConvertError(f"weight {key!r} of {m.name} is neither a layer nor a first/last-stage weight")
    return stages


def merge_stages(stages: list[StateDict], parallel: ParallelConfig, modules: list[ModuleSchema]) -> StateDict:
    """Inverse of partition_stages: global layer indices again."""
    out: StateDict = {}
    for s, sd in enumerate(stages):
        for key, value in sd.items():
            m = next((m for m in modules if key.startswith(m.layer_prefix)), None)
            if m is not None:
                idx_s, rest = key[len(m.layer_prefix):].split(".", 1)
                a, b = stage_ranges(getattr(parallel, m.pp_field))[s]
                idx = int(idx_s) + a
                if idx >= b:
                    raise ConvertError(f"stage {s} holds {key!r}, but {m.pp_field} gives that stage only {b - a} layers")
                key = f"{m.layer_prefix}{idx}.{rest}"
            if key in out and not torch.equal(out[key], value):
                raise ConvertError(f"weight {key!r} appears on several stages with different values")
            out.setdefault(key, value)
    return out


# ---------------------------------------------------------------------------------- TP helpers
def _check_div(t: torch.Tensor, dim: int, n: int, key: str) -> None:
    if t.shape[dim] % n:
        raise ConvertError(f"weight {key!r} dim {dim} of size {t.shape[dim]} cannot be split {n} ways")


def split_column(t: torch.Tensor, n: int, key: str = "") -> list[torch.Tensor]:
    _check_div(t, 0, n, key)
    return list(torch.chunk(t, n, dim=0))  # views: writers copy only what they write


def split_row(t: torch.Tensor, n: int, key: str = "") -> list[torch.Tensor]:
    _check_div(t, 1, n, key)
    return list(torch.chunk(t, n, dim=1))


def split_glu(t: torch.Tensor, n: int, key: str = "") -> list[torch.Tensor]:
    """[gate; up] -> rank i holds [gate_i; up_i]."""
    _check_div(t, 0, 2 * n, key)
    gate, up = torch.chunk(t, 2, dim=0)
    return [torch.cat([g, u], dim=0) for g, u in zip(torch.chunk(gate, n), torch.chunk(up, n))]


def merge_column(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def merge_row(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=1)


def merge_glu(ts: list[torch.Tensor]) -> torch.Tensor:
    halves = [torch.chunk(t, 2, dim=0) for t in ts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# ---------------------------------------------------------------------------------- lazy row fusions
_LAZY = contextvars.ContextVar("omnitune_lazy_row_cat", default=False)


@contextlib.contextmanager
def lazy_row_cat():
    """Inside: :func:`cat_rows` returns a :class:`RowCat` (no copy) instead of a new tensor.

    Only the streaming hf_to_mm writer turns it on: a fused weight (qkv interleave, gate/up) and each
    of its TP shards are then written piece by piece straight from the input files
    (``stream.FileSink``: ``copy_file_range`` for large pieces), never assembled in memory."""
    token = _LAZY.set(True)
    try:
        yield
    finally:
        _LAZY.reset(token)


class RowCat:
    """``torch.cat(parts, dim=0)``, not yet made: the parts (tensors with equal trailing shapes) and
    the row ranges of them. Supports what the hf_to_mm writer path needs: shape/dtype/size, row
    slices (TP column and GLU shards, still lazy) and :meth:`materialize`."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = [p for p in parts if p.shape[0]] or parts[:1]
        p0 = parts[0]
        self.dtype, self.device = p0.dtype, p0.device
        self.shape = torch.Size((sum(p.shape[0] for p in parts), *p0.shape[1:]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def rows(self, a: int, b: int) -> "RowCat":
        """Rows [a, b) (still lazy)."""
        out, pos = [], 0
        for p in self.parts:
            n = p.shape[0]
            lo, hi = max(a - pos, 0), min(b - pos, n)
            if lo < hi:
                out.append(p[lo:hi])
            pos += n
        return RowCat(out or [self.parts[0][:0]])

    def chunk_rows(self, n: int) -> list["RowCat"]:
        k = self.shape[0] // n
        return [self.rows(i * k, (i + 1) * k) for i in range(n)]

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=0)


def cat_rows(parts: list[torch.Tensor]) -> Union[torch.Tensor, RowCat]:
    """``torch.cat(parts, dim=0)``; a :class:`RowCat` inside :func:`lazy_row_cat` (real tensors only)."""
    if _LAZY.get() and parts and all(isinstance(p, torch.Tensor) and not p.is_meta for p in parts):
        return RowCat(parts)
    return torch.cat(parts, dim=0)


def materialize(t):
    """A real tensor for a :class:`RowCat`; anything else unchanged."""
    return t.materialize() if isinstance(t, RowCat) else t


SPLITTERS: dict[str, Callable] = {"column": split_column, "row": split_row, "glu": split_glu}
MERGERS: dict[str, Callable] = {"column": merge_column, "row": merge_row, "glu": merge_glu}


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q=[q heads], k=[k heads], v=[v heads] -> [q heads of group g, k_g, v_g] for each group g (dim 0)."""
    parts = [torch.chunk(x, groups, dim=0) for x in (q, k, v)]
    return cat_rows([p for g in zip(*parts) for p in g])


def deinterleave_qkv(qkv: torch.Tensor, groups: int, sizes: tuple[int, int, int]):
    """Inverse of interleave_qkv; sizes = rows of q, k, v per group."""
    qs, ks, vs = zip(*[torch.split(g, list(sizes), dim=0) for g in torch.chunk(qkv, groups, dim=0)])
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def glu_views(t: torch.Tensor, n: int, key: str = "") -> list[torch.Tensor]:
    """split_glu without copies: rank i gets the (2, rows/2n, ...) view [gate_i, up_i] of ``t``;
    ``t.flatten(0, 1)`` of it is split_glu's shard (a writer copies it once, where it writes it)."""
    _check_div(t, 0, 2 * n, key)
    if not t.is_contiguous():
        return split_glu(t, n, key)
    v = t.view(2, n, t.shape[0] // (2 * n), *t.shape[1:])
    return [v[:, i] for i in range(n)]


def split_tp(sd: StateDict, parallel: ParallelConfig, modules: list[ModuleSchema],
             rule: Callable[[str], Optional[str]], views: bool = False) -> list[StateDict]:
    """Full state dict -> max_tp state dicts. A module with a smaller TP size is replicated
    (folder i holds its shard i % module_tp). rule(key) -> "column" | "row" | "glu" | None.
    views: GLU shards as :func:`glu_views` (one dim more) instead of concatenated copies."""
    n = parallel.max_tp
    out: list[StateDict] = [{} for _ in range(n)]
    for key, value in sd.items():
        kind = rule(key)
        m = next((m for m in modules if key.startswith(m.key_prefix)), None)
        tp = parallel.module_tp(m.tp_field) if m else parallel.tp_size
        if kind is None or tp == 1:
            for r in range(n):
                out[r][key] = value
            continue
        if isinstance(value, RowCat) and kind == "column":
            _check_div(value, 0, tp, key)
            shards = value.chunk_rows(tp)
        elif isinstance(value, RowCat) and kind == "glu":  # rank i: [gate_i; up_i], still lazy
            _check_div(value, 0, 2 * tp, key)
            gate, up = value.chunk_rows(2)
            shards = [RowCat(g.parts + u.parts) for g, u in zip(gate.chunk_rows(tp), up.chunk_rows(tp))]
        else:
            shards = (glu_views if views and kind == "glu" else SPLITTERS[kind])(materialize(value), tp, key)
        for r in range(n):
            out[r][key] = shards[r % tp]
    return out


def merge_tp(tp_sds: list[StateDict], parallel: ParallelConfig, modules: list[ModuleSchema],
             rule: Callable[[str], Optional[str]]) -> StateDict:
    out: StateDict = {}
    keys = list(tp_sds[0])
    for r, sd in enumerate(tp_sds[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise ConvertError(f"TP rank {r} does not hold the same weights as rank 0 (e.g. {diff})")
    for key in keys:
        kind = rule(key)
        m = next((m for m in modules if key.startswith(m.key_prefix)), None)
        tp = parallel.module_tp(m.tp_field) if m else parallel.tp_size
        if kind is None or tp == 1:
            out[key] = tp_sds[0][key]
        else:
            out[key] = MERGERS[kind]([sd[key] for sd in tp_sds[:tp]])
    return out


# ---------------------------------------------------------------------------------- folders
def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def check_output_dir(path: Path, overwrite: bool, field_name: str) -> None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConvertError(f"{field_name}={path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConvertError(f"{field_name}={path} is not empty; pass --cfg.overwrite true to replace it")


def mm_iteration_dir(mm_dir: Path, field_name: str) -> Path:
    mm_dir = Path(mm_dir)
    latest = mm_dir / LATEST_TXT
    if not latest.is_file():
        raise ConvertError(f"{field_name}={mm_dir}: no {LATEST_TXT}; not an mm checkpoint folder")
    it = latest.read_bytes().decode("utf-8", "replace").strip()
    if it != "release" and not it.isdigit():
        raise ConvertError(f"{field_name}={mm_dir}: {latest} holds {it[:40]!r}, not an iteration number or "
                           f"'release'; write the number of a complete iter_* folder into it")
    d = mm_dir / (it if it == "release" else f"iter_{int(it):07d}")
    if not d.is_dir():
        raise ConvertError(f"{field_name}={mm_dir}: {LATEST_TXT} names {it!r} but {d} does not exist")
    return d


# ---------------------------------------------------------------------------------- HF folders
def check_hf_dir(hf_dir: Path, field_name: str) -> None:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"{field_name}={hf_dir} is not a folder")
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(f"{field_name}={hf_dir} has no config.json")
    if not list(hf_dir.glob("*.safetensors")):
        raise ConvertError(f"{field_name}={hf_dir} has no *.safetensors weights")


def read_hf_config(hf_dir: Path) -> dict:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def match_any(patterns: list[str], key: str) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)
