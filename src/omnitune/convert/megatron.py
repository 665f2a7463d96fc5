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


def mm_to_hf(km: ModuleType, cfg: MmToHfConfig, family: Optional[str] = None) -> None:
    sizes = hf_sizes(km, cfg.hf_config.hf_dir)
    ckpt = training_save(cfg.mm_dir)
    if ckpt is not None:
        return _training_save_to_hf(cfg, ckpt, family)
    par = cfg.parallel_config
    mods = km.modules(sizes)
    L.validate_layout(par, mods, divisible=km.tp_divisibility(sizes))
    L.check_output_dir(cfg.save_hf_dir, cfg.overwrite, "save_hf_dir")
    source = E.MmSource(cfg.mm_dir, par, mods, km, "mm_dir")
    E.mm_to_hf(source, km, sizes, cfg.hf_config.hf_dir, cfg.save_hf_dir, f"mm_dir={cfg.mm_dir}")


def resplit(km: ModuleType, cfg: ResplitConfig, family: Optional[str] = None) -> None:
    ckpt = training_save(cfg.source_dir)
    if ckpt is not None:
        return _training_save_to_mm(km, cfg, ckpt, family)
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


# ------------------------------------------------------------------------------------ omnitune saves
def training_save(path: Path) -> Optional[Path]:
    """The DCP iteration folder when ``path`` is an omnitune training save dir (``iter_XXXXXXX/`` +
    latest_checkpointed_iteration.txt) or one of its iteration folders; None for anything else (a
    Megatron folder's ``release/`` holds ``mp_rank_*`` folders, no DCP ``.metadata``)."""
    from omnitune.checkpoint import dcp as ckpt_io

    p = Path(path)
    if (p / ".metadata").is_file():
        return p
    if not (p / ckpt_io.LATEST).is_file():
        return None
    text = (p / ckpt_io.LATEST).read_text(errors="replace").strip()
    if text == "release":
        d = p / "release"
    elif text.isdigit():
        d = p / ckpt_io.iter_dir_name(int(text))
    else:
        d = None
    if d is not None and (d / ".metadata").is_file():
        return d
    complete = sorted(x.name for x in p.glob("iter_*") if (x / ".metadata").is_file())
    if complete:  # a save dir whose pointer is wrong: not a Megatron folder either
        raise L.ConvertError(f"{p} is an omnitune training save, but its {ckpt_io.LATEST} names {text[:40]!r}, which "
                             f"is not a complete checkpoint there; write one of its iterations "
                             f"({', '.join(str(int(n[5:])) for n in complete[-3:] if n[5:].isdigit())}) into it")
    return None


def _check_family(hf_dir: Path, family: Optional[str]) -> None:
    """The HF folder must be the converter's family (a save dir of another family would fail deep in
    the DCP load)."""
    if family is None:
        return
    from transformers import AutoConfig

    from omnitune.models.registry import family_for_hf_config

    got = family_for_hf_config(AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)).name
    if got != family:
        raise L.ConvertError(f"hf_config.hf_dir={hf_dir} is a {got} model, not {family}; use the {got} converter "
                             f"(mm-convert --help lists them)")


def _export(ckpt: Path, out: Path, hf_dir: Path, field_name: str) -> None:
    from omnitune.checkpoint.export import export_hf

    try:
        export_hf(ckpt, out, hf_dir, overwrite=True)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if msg.startswith("--model-assets "):   # name the flag as the mm-convert user typed it
            msg = "hf_config.hf_dir=" + msg.removeprefix("--model-assets ")
        elif msg.startswith("--load "):
            msg = f"{field_name}=" + msg.removeprefix("--load ")
        else:
            msg = f"{field_name}={ckpt}: {msg}"
        raise L.ConvertError(msg) from e


def _training_save_to_hf(cfg: MmToHfConfig, ckpt: Path, family: Optional[str]) -> None:
    """An omnitune save dir (DCP, layout-free): the same folder ``omnitune export`` writes;
    parallel_config is not needed."""
    hf_dir = Path(cfg.hf_config.hf_dir)
    _check_family(hf_dir, family)
    L.check_output_dir(cfg.save_hf_dir, cfg.overwrite, "save_hf_dir")
    print(f"mm-convert: mm_dir={cfg.mm_dir} is an omnitune training save ({ckpt.name}, DCP, layout-free): "
          f"parallel_config is ignored; writing what `omnitune export --load {cfg.mm_dir} --save "
          f"{cfg.save_hf_dir} --model-assets {hf_dir}` writes", file=sys.stderr)
    _export(ckpt, Path(cfg.save_hf_dir), hf_dir, "mm_dir")


def _training_save_to_mm(km: ModuleType, cfg: ResplitConfig, ckpt: Path, family: Optional[str]) -> None:
    """An omnitune save dir -> the Megatron layout target_parallel_config: exported to a temp HF
    folder (as ``omnitune export``), then hf_to_mm from it. Needs the original HF folder for its
    config and file layout: hf_config.hf_dir, else the one the training run recorded."""
    import shutil
    import tempfile

    from omnitune.checkpoint import dcp as ckpt_io

    hf = cfg.hf_config.hf_dir if cfg.hf_config is not None else ckpt_io.read_trainer_state(ckpt).get("hf_dir")
    if not hf or not (Path(hf) / "config.json").is_file():
        raise L.ConvertError(f"source_dir={cfg.source_dir} is an omnitune training save ({ckpt.name}, DCP, "
                             f"layout-free) whose original HF folder is unknown; add --cfg.hf_config.hf_dir "
                             f"<original HF folder>")
    hf_dir = Path(hf)
    sizes = hf_sizes(km, hf_dir)
    dst = cfg.target_parallel_config
    L.validate_layout(dst, km.modules(sizes), "target_parallel_config", divisible=km.tp_divisibility(sizes))
    _check_family(hf_dir, family)
    L.check_output_dir(cfg.target_dir, cfg.overwrite, "target_dir")
    print(f"mm-convert: source_dir={cfg.source_dir} is an omnitune training save ({ckpt.name}, DCP, layout-free): "
          f"source_parallel_config is ignored; writing target_parallel_config's layout from it", file=sys.stderr)
    target = Path(cfg.target_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".hf-", dir=target.parent))
    try:
        _export(ckpt, scratch / "hf", hf_dir, "source_dir")
        hf_to_mm(km, HfToMmConfig(mm_dir=target, hf_config=HfConfig(hf_dir=scratch / "hf"), parallel_config=dst,
                                  overwrite=cfg.overwrite))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def make_converter(class_name: str, km: ModuleType, doc: str, family: Optional[str] = None) -> type:
    """A converter class for the CLI: static methods hf_to_mm / mm_to_hf / resplit bound to ``km``;
    ``family`` (registry name) is checked when mm_to_hf / resplit read an omnitune save dir."""

    def _hf_to_mm(cfg: HfToMmConfig) -> None:
        """Hugging Face folder -> mm checkpoint (TP/PP/VPP split)."""
        hf_to_mm(km, cfg)

    def _mm_to_hf(cfg: MmToHfConfig) -> None:
        """mm checkpoint (or an omnitune training save dir) -> Hugging Face folder."""
        mm_to_hf(km, cfg, family)

    def _resplit(cfg: ResplitConfig) -> None:
        """mm checkpoint (or an omnitune training save dir) -> mm checkpoint with another TP/PP layout."""
        resplit(km, cfg, family)

    for f, n in ((_hf_to_mm, "hf_to_mm"), (_mm_to_hf, "mm_to_hf"), (_resplit, "resplit")):
        f.__name__ = n
        f.__qualname__ = f"{class_name}.{n}"
    return type(class_name, (), {"__doc__": doc, "_keymap": km, "hf_to_mm": staticmethod(_hf_to_mm),
                                 "mm_to_hf": staticmethod(_mm_to_hf), "resplit": staticmethod(_resplit)})
