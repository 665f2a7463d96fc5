"""``mm-convert Qwen2VLConverter {hf_to_mm, mm_to_hf, resplit}``.

Flags as in MindSpeed-MM: ``--cfg.mm_dir``, ``--cfg.hf_config.hf_dir``,
``--cfg.parallel_config.{llm_pp_layers,vit_pp_layers,tp_size,vit_tp_size}``, ``--cfg.save_hf_dir``,
``--cfg.source_dir``/``--cfg.target_dir``/``--cfg.{source,target}_parallel_config.*``.
Everything is validated and converted in memory first; the output folder is written into a temp
folder and renamed, so a refused or failed run leaves nothing behind.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict

from omnitune.convert import layout as L
from omnitune.models.qwen2_vl import keymap as K


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


def _sizes(hf_dir: Path) -> K.Sizes:
    L.check_hf_dir(hf_dir, "hf_config.hf_dir")
    return K.Sizes.from_config(L.read_hf_config(hf_dir))


def _split_and_partition(mm: L.StateDict, par: L.ParallelConfig, mods) -> list[list[L.StateDict]]:
    return [L.partition_stages(sd, par, mods) for sd in L.split_tp(mm, par, mods, K.tp_rule)]


def _read_and_merge(mm_dir: Path, par: L.ParallelConfig, mods, field: str) -> L.StateDict:
    tp_stage = L.read_mm(mm_dir, par, field)
    return L.merge_tp([L.merge_stages(st, par, mods) for st in tp_stage], par, mods, K.tp_rule)


class Qwen2VLConverter:
    """Qwen2-VL: Hugging Face <-> MindSpeed-MM checkpoints."""

    @staticmethod
    def hf_to_mm(cfg: HfToMmConfig) -> None:
        """Hugging Face folder -> mm checkpoint (TP/PP/VPP split)."""
        sizes = _sizes(cfg.hf_config.hf_dir)
        par = cfg.parallel_config
        mods = K.modules(sizes)
        L.validate_layout(par, mods, divisible=K.tp_divisibility(sizes))
        L.check_output_dir(cfg.mm_dir, cfg.overwrite, "mm_dir")
        mm = K.hf_to_mm(L.load_hf(cfg.hf_config.hf_dir), sizes, par.pp_size)
        L.write_mm(cfg.mm_dir, _split_and_partition(mm, par, mods), par)

    @staticmethod
    def mm_to_hf(cfg: MmToHfConfig) -> None:
        """mm checkpoint -> Hugging Face folder."""
        sizes = _sizes(cfg.hf_config.hf_dir)
        par = cfg.parallel_config
        mods = K.modules(sizes)
        L.validate_layout(par, mods, divisible=K.tp_divisibility(sizes))
        L.check_output_dir(cfg.save_hf_dir, cfg.overwrite, "save_hf_dir")
        mm = _read_and_merge(cfg.mm_dir, par, mods, "mm_dir")
        hf = K.mm_to_hf(mm, sizes)
        key_files = L.hf_key_files(cfg.hf_config.hf_dir)
        _, new_style = K.normalize_hf_keys(dict.fromkeys(key_files))
        if new_style:
            hf = {K.denormalize_hf_key(k): v for k, v in hf.items()}
        if "lm_head.weight" not in key_files:
            hf.pop("lm_head.weight", None)  # tied: HF stores only the embedding
        missing = sorted(set(key_files) - set(hf))
        extra = sorted(set(hf) - set(key_files))
        if missing or extra:
            raise L.ConvertError(f"mm_dir={cfg.mm_dir} does not match hf_config.hf_dir={cfg.hf_config.hf_dir}: "
                                 f"missing {missing[:5]}, unexpected {extra[:5]}")
        L.write_hf(cfg.save_hf_dir, hf, key_files, cfg.hf_config.hf_dir)

    @staticmethod
    def resplit(cfg: ResplitConfig) -> None:
        """mm checkpoint -> mm checkpoint with another TP/PP layout."""
        src, dst = cfg.source_parallel_config, cfg.target_parallel_config
        # layer counts and head counts come from the source layout (no HF config needed)
        for name in ("llm_pp_layers", "vit_pp_layers"):
            a, b = sum(L.flat(getattr(src, name))), sum(L.flat(getattr(dst, name)))
            if a != b:
                raise L.ConvertError(f"target_parallel_config.{name} sums to {b}, source_parallel_config.{name} to {a}")
        sizes = K.Sizes(llm_layers=sum(L.flat(src.llm_pp_layers)), heads=0, kv_heads=0, head_dim=0,
                        vit_layers=sum(L.flat(src.vit_pp_layers)), vit_heads=0, vit_dim=0, tie=False)
        mods = K.modules(sizes)
        L.validate_layout(src, mods, "source_parallel_config")
        if cfg.hf_config is not None:
            full = _sizes(cfg.hf_config.hf_dir)
            L.validate_layout(dst, K.modules(full), "target_parallel_config", divisible=K.tp_divisibility(full))
        else:
            L.validate_layout(dst, mods, "target_parallel_config")
            if dst.max_tp > 1:
                print("mm-convert: warning: resplit without --cfg.hf_config.hf_dir cannot check that the head "
                      "counts divide the target TP size", file=sys.stderr)
        if not Path(cfg.source_dir).is_dir():
            raise L.ConvertError(f"source_dir={cfg.source_dir} is not a folder")
        L.check_output_dir(cfg.target_dir, cfg.overwrite, "target_dir")
        mm = _read_and_merge(cfg.source_dir, src, mods, "source_dir")
        if dst.pp_size > 1 and K.OUTPUT_LAYER not in mm and K.WORD_EMBEDDINGS in mm:
            mm[K.OUTPUT_LAYER] = mm[K.WORD_EMBEDDINGS]  # no output_layer = tied; PP > 1 needs the copy
        try:
            tp_stage = _split_and_partition(mm, dst, mods)
        except L.ConvertError as e:
            raise L.ConvertError(f"target_parallel_config: {e}") from e
        L.write_mm(cfg.target_dir, tp_stage, dst)


CONVERTERS = [Qwen2VLConverter]
