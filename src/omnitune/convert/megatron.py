"""``mm-convert <Family>Converter {hf_to_mm, mm_to_hf, resplit}``: the MindSpeed-MM Megatron layout.

Flags as in MindSpeed-MM: ``--cfg.mm_dir``, ``--cfg.hf_config.hf_dir``,
``--cfg.parallel_config.{llm_pp_layers,vit_pp_layers,audio_pp_layers,tp_size,vit_tp_size,audio_tp_size}``,
``--cfg.save_hf_dir``, ``--cfg.source_dir``/``--cfg.target_dir``/``--cfg.{source,target}_parallel_config.*``.
Everything is validated before anything is written; outputs are streamed layer by layer into a temp
folder that is renamed at the end (see ``engine``), so a refused or failed run leaves nothing behind.

A converter class is :func:`make_converter` applied to a family keymap; the family knowledge (names,
fusions, TP splits) is only in ``omnitune.models.<family>.keymap``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

from pydantic import BaseModel, ConfigDict

from omnitune.convert import engine as E
from omnitune.convert import layout as L


class HfConfig(BaseModel):
    """The original Hugging Face folder."""
    model_config = ConfigDict(extra="forbid")
    hf_dir: Path
    """HF folder with config.json and *.safetensors"""


class HfToMmConfig(BaseModel):
    """HF folder -> mm (Megatron) checkpoint."""
    model_config = ConfigDict(extra="forbid")
    mm_dir: Path
    """output mm folder"""
    hf_config: HfConfig
    """original HF folder"""
    parallel_config: L.ParallelConfig
    """layout of the mm checkpoint"""
    overwrite: bool = False
    """replace a non-empty mm_dir"""


class MmToHfConfig(BaseModel):
    """mm checkpoint -> HF folder (weights + the original folder's other files)."""
    model_config = ConfigDict(extra="forbid")
    mm_dir: Path
    """mm folder to read"""
    hf_config: HfConfig
    """original HF folder (config, tokenizer, weight file layout)"""
    parallel_config: L.ParallelConfig
    """layout of the mm checkpoint"""
    save_hf_dir: Path
    """output HF folder"""
    overwrite: bool = False
    """replace a non-empty save_hf_dir"""


class ResplitConfig(BaseModel):
    """mm checkpoint with one layout -> mm checkpoint with another."""
    model_config = ConfigDict(extra="forbid")
    source_dir: Path
    """mm folder to read"""
    target_dir: Path
    """output mm folder"""
    source_parallel_config: L.ParallelConfig
    """layout of source_dir"""
    target_parallel_config: L.ParallelConfig
    """layout to write"""
    hf_config: Optional[HfConfig] = None
    """optional (omnitune extension): original HF folder, to check head counts against the target TP size"""
    overwrite: bool = False
    """replace a non-empty target_dir"""


def hf_sizes(km: ModuleType, hf_dir: Path):
    L.check_hf_dir(hf_dir, "hf_config.hf_dir")
    return km.Sizes.from_config(L.read_hf_config(hf_dir))


def tied_copy(km: ModuleType, parallel: L.ParallelConfig, all_keys):
    """PP > 1 needs output_layer on the last stage: a tied checkpoint (no output_layer at all) gets a copy."""
    tied = km.OUTPUT_LAYER not in all_keys

    def fix(sd: dict) -> dict:
        if tied and parallel.pp_size * parallel.vpp_size > 1 and km.WORD_EMBEDDINGS in sd:
            sd = dict(sd)
            sd[km.OUTPUT_LAYER] = sd[km.WORD_EMBEDDINGS]
        return sd
    return fix


def hf_to_mm(km: ModuleType, cfg: HfToMmConfig) -> None:
    sizes = hf_sizes(km, cfg.hf_config.hf_dir)
    par = cfg.parallel_config
    mods = km.modules(sizes)
    L.validate_layout(par, mods, divisible=km.tp_divisibility(sizes))
    L.check_output_dir(cfg.mm_dir, cfg.overwrite, "mm_dir")
    src = E.HfSource(cfg.hf_config.hf_dir, km, sizes, par.pp_size * par.vpp_size)
    E.run_to_mm(src, E.MmSink(par, mods, km), cfg.mm_dir, "hf_to_mm")


def mm_to_hf(km: ModuleType, cfg: MmToHfConfig) -> None:
    sizes = hf_sizes(km, cfg.hf_config.hf_dir)
    par = cfg.parallel_config
    mods = km.modules(sizes)
    L.validate_layout(par, mods, divisible=km.tp_divisibility(sizes))
    L.check_output_dir(cfg.save_hf_dir, cfg.overwrite, "save_hf_dir")
    source = E.MmSource(cfg.mm_dir, par, mods, km, "mm_dir")
    E.mm_to_hf(source, km, sizes, cfg.hf_config.hf_dir, cfg.save_hf_dir, f"mm_dir={cfg.mm_dir}")


def resplit(km: ModuleType, cfg: ResplitConfig) -> None:
    src, dst = cfg.source_parallel_config, cfg.target_parallel_config
    for name in ("llm_pp_layers", "vit_pp_layers", "audio_pp_layers"):
        a, b = getattr(src, name), getattr(dst, name)
        if (a is None) != (b is None):
            raise L.ConvertError(f"target_parallel_config.{name} must be given exactly when "
                                 f"source_parallel_config.{name} is")
        if a is not None and sum(L.flat(a)) != sum(L.flat(b)):
            raise L.ConvertError(f"target_parallel_config.{name} sums to {sum(L.flat(b))}, "
                                 f"source_parallel_config.{name} to {sum(L.flat(a))}")
    sizes = km.sizes_from_layout(src)  # layer counts from the source layout (no HF config needed)
    mods = km.modules(sizes)
    L.validate_layout(src, mods, "source_parallel_config")
    if cfg.hf_config is not None:
        full = hf_sizes(km, cfg.hf_config.hf_dir)
        L.validate_layout(dst, km.modules(full), "target_parallel_config", divisible=km.tp_divisibility(full))
    else:
        L.validate_layout(dst, mods, "target_parallel_config")
        if dst.max_tp > 1:
            print("mm-convert: warning: resplit without --cfg.hf_config.hf_dir cannot check that the head "
                  "counts divide the target TP size", file=sys.stderr)
    if not Path(cfg.source_dir).is_dir():
        raise L.ConvertError(f"source_dir={cfg.source_dir} is not a folder")
    L.check_output_dir(cfg.target_dir, cfg.overwrite, "target_dir")
    source = E.MmSource(cfg.source_dir, src, mods, km, "source_dir")
    try:
        E.run_to_mm(source, E.MmSink(dst, mods, km), cfg.target_dir, "resplit", extra=tied_copy(km, dst, source.metas[0]))
    except L.ConvertError as e:
        raise L.ConvertError(f"target_parallel_config: {e}") from e


def make_converter(class_name: str, km: ModuleType, doc: str) -> type:
    """A converter class for the CLI: static methods hf_to_mm / mm_to_hf / resplit bound to ``km``."""

    def _hf_to_mm(cfg: HfToMmConfig) -> None:
        """Hugging Face folder -> mm checkpoint (TP/PP/VPP split)."""
        hf_to_mm(km, cfg)

    def _mm_to_hf(cfg: MmToHfConfig) -> None:
        """mm checkpoint -> Hugging Face folder."""
        mm_to_hf(km, cfg)

    def _resplit(cfg: ResplitConfig) -> None:
        """mm checkpoint -> mm checkpoint with another TP/PP layout."""
        resplit(km, cfg)

    for f, n in ((_hf_to_mm, "hf_to_mm"), (_mm_to_hf, "mm_to_hf"), (_resplit, "resplit")):
        f.__name__ = n
        f.__qualname__ = f"{class_name}.{n}"
    return type(class_name, (), {"__doc__": doc, "_keymap": km, "hf_to_mm": staticmethod(_hf_to_mm),
                                 "mm_to_hf": staticmethod(_mm_to_hf), "resplit": staticmethod(_resplit)})
