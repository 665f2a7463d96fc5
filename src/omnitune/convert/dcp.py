"""HF <-> DCP conversion, streamed one layer at a time (MindSpeed-MM's FSDP2 checkpoint format).

Layout written by ``hf_to_dcp`` (as MindSpeed-MM writes it)::

    <out>/latest_checkpointed_iteration.txt        # "release"
    <out>/release/.metadata, __0_0.distcp          # {"model": {"model." + name: tensor}, "checkpoint_version": 3.0}

``dcp_to_hf`` reads an iteration folder (``release`` or ``iter_XXXXXXX``) of such a checkpoint - or
of omnitune's own training saves, whose names carry one ``model.`` less - and writes safetensors.
Which names and how experts fuse is family knowledge, given as functions by the caller.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from omnitune.convert import layout as L
from omnitune.convert.dcp_io import DcpIndex, DcpWriter
from omnitune.convert.engine import _copy_non_weights, _nbytes, _progress, group_of, release_memory_eagerly
from omnitune.convert.stream import SafetensorsIndex, SafetensorsWriter
from omnitune.fsutil import atomic_dir

DCP_CHECKPOINT_VERSION = 3.0
DCP_PREFIX = "model."  # MindSpeed-MM's converters put the HF names under "model." inside the "model" entry

Convert = Callable[[dict], dict]


def hf_groups(idx: SafetensorsIndex, group_fn: Callable[[str], str] = group_of) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k in idx.keys():
        out.setdefault(group_fn(k), []).append(k)
    return out


def hf_to_dcp_stream(hf_dir: Path, out_dir: Path, convert: Convert, overwrite: bool, field_out: str,
                     group_fn: Callable[[str], str] = group_of, desc: str = "hf_to_dcp") -> None:
    """HF folder -> ``out_dir/release`` DCP + latest file. ``convert``: {HF name: tensor} of one group
    -> {name inside the "model" entry: tensor}."""
    L.check_output_dir(out_dir, overwrite, field_out)
    release_memory_eagerly()
    idx = SafetensorsIndex(hf_dir)
    try:
        groups = hf_groups(idx, group_fn)
        # plan on meta tensors first: a naming problem is found before anything is written
        names: dict[str, str] = {}
        for g, keys in groups.items():
            for k in convert({k: idx.meta(k) for k in keys}):
                if k in names:
                    raise L.ConvertError(f"two HF weight groups ({names[k]}, {g}) both give DCP entry {k!r}")
                names[k] = g
        bar = _progress(sum(idx.nbytes(k) for k in idx.keys()), desc)
        try:
            with atomic_dir(out_dir) as tmp:
                w = DcpWriter(tmp / "release")
                for g, keys in groups.items():
                    sd = convert({k: idx.read(k) for k in keys})
                    for k, t in sd.items():
                        w.add(("model", k), t)
                    bar.update(sum(idx.nbytes(k) for k in keys))
                    del sd
                w.add(("checkpoint_version",), DCP_CHECKPOINT_VERSION)
                w.finish()
                (tmp / L.LATEST_TXT).write_text("release")
        finally:
            bar.close()
    finally:
        idx.close()


def resolve_dcp_dir(path: Path, field_name: str) -> Path:
    """An iteration folder (has .metadata) or a root with latest_checkpointed_iteration.txt."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    if (path / L.LATEST_TXT).is_file():
        it = (path / L.LATEST_TXT).read_text(errors="replace").strip()
        if it != "release" and not (it.isascii() and it.isdigit()):
            raise L.ConvertError(f"{field_name}={path}: {path / L.LATEST_TXT} holds {it[:40]!r}, not an iteration "
                                 f"number; write the number of an existing iter_* folder into it, or give the "
                                 f"iter_XXXXXXX / release folder itself")
        d = path / (it if it == "release" else f"iter_{int(it):07d}")
        if (d / ".metadata").is_file():
            return d
        raise L.ConvertError(f"{field_name}={path}: {L.LATEST_TXT} names {it!r} but {d} has no .metadata")
    raise L.ConvertError(f"{field_name}={path} is not a DCP checkpoint (no .metadata; give the iter_XXXXXXX "
                         f"or release folder)")


class DcpSource:
    """HF-named tensors of a DCP checkpoint: ``model.model.<name>`` (MindSpeed-MM) or ``model.<name>``
    (omnitune training saves; only the model part is read)."""

    def __init__(self, dcp_dir: Path, field_name: str, inner_prefix: str = DCP_PREFIX,
                 expected: Optional[set] = None):
        """expected: the HF names the checkpoint should hold; decides between the two prefixes
        (MindSpeed-MM's ``model.`` + inner_prefix and omnitune's ``model.``), which can look alike."""
        self.dir = resolve_dcp_dir(dcp_dir, field_name)
        self.idx = DcpIndex(self.dir)
        keys = [k for k in self.idx.tensor_keys() if k.startswith("model.")]
        if not keys:
            raise L.ConvertError(f"{field_name}={dcp_dir}: no 'model' entries in {self.dir}")
        cands = [p for p in ("model." + inner_prefix, "model.") if all(k.startswith(p) for k in keys)]
        if expected is not None:
            cands.sort(key=lambda p: -sum(k[len(p):] in expected for k in keys))
        self.strip = cands[0]
        self.names = {k[len(self.strip):]: k for k in keys}

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.names:
            out.setdefault(group_of(n), []).append(n)
        return out

    def meta(self, name: str) -> torch.Tensor:
        return self.idx.meta(self.names[name])

    def read(self, name: str) -> torch.Tensor:
        return self.idx.read(self.names[name])


def plan_shards(metas: dict[str, torch.Tensor], max_shard_size: int) -> dict[str, list[str]]:
    """Greedy shards in key order, as HF's splitter names them (one shard: model.safetensors)."""
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in metas.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20,
             "GIB": 2 ** 30, "B": 1}
    u = s.strip().upper()
    for name, mult in sorted(units.items(), key=lambda x: -len(x[0])):
        if u.endswith(name):
            return int(float(u[: -len(name)]) * mult)
    return int(u)


def write_hf_stream(save_dir: Path, assets_dir: Optional[Path], groups: Iterable[tuple[str, Callable[[], dict]]],
                    metas: dict[str, torch.Tensor], files: dict[str, list[str]], write_index: bool,
                    desc: str, keep_index_of_assets: bool = False) -> None:
    """Write HF safetensors ``files`` ({file: [names]}) from ``groups`` (each a loader returning
    {name: tensor}), plus the non-weight files of ``assets_dir``; atomically."""
    file_of = {k: f for f, ks in files.items() for k in ks}
    release_memory_eagerly()
    bar = _progress(_nbytes(metas), desc)
    try:
        with atomic_dir(save_dir) as tmp:
            if assets_dir is not None:
                _copy_non_weights(Path(assets_dir), tmp)
                if not keep_index_of_assets:
                    for p in tmp.glob("*.safetensors.index.json"):
                        p.unlink()
            writers = {f: SafetensorsWriter(tmp / f, {k: metas[k] for k in ks}, {"format": "pt"})
                       for f, ks in files.items()}
            for _, load in groups:
                for k, t in load().items():
                    writers[file_of[k]].write(k, t)
                    bar.update(t.numel() * t.element_size())
            for w in writers.values():
                w.close()
            if write_index:
                index = {"metadata": {"total_size": _nbytes(metas)}, "weight_map": dict(sorted(file_of.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    finally:
        bar.close()


def warn(msg: str) -> None:
    print(f"mm-convert: warning: {msg}", file=sys.stderr)
