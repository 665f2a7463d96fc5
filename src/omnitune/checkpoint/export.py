"""Training checkpoint (DCP) -> Hugging Face folder that plain ``transformers`` loads.

The folder is the original HF folder (``--model-assets``) with its weights replaced: the same
safetensors files holding the same tensor names in the same order, and every other file (config.json,
generation_config.json, tokenizer, processor, chat template, Qwen2.5-Omni's spk_dict.pt ...) copied
byte for byte. Nothing is re-saved through the installed transformers: a folder that transformers
4.57 (vLLM, LLaMA-Factory, MindSpeed-MM) loads still loads there after export, whichever transformers
trained it. Written to a temp folder and renamed at the end.

Omni families train the thinker only; their export is a FULL folder again: the trained ``thinker.*``
tensors plus every other tensor (talker, vocoder) copied untouched from the original folder.

A LoRA checkpoint (adapters only) exports either as a peft adapter folder for the base model
(adapter_config.json + adapter_model.safetensors, the original folder's non-weight files beside
them, config.json left out: an adapter folder is not a model folder), or with ``merge_lora`` as a
full HF folder like above: the base weights with the adapters merged in by peft.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from omnitune.checkpoint import dcp as ckpt_io
from omnitune.fsutil import atomic_dir

_INDEX = "model.safetensors.index.json"


def export_hf(load: str | Path, save: str | Path, model_assets: str | Path | None = None,
              overwrite: bool = False, merge_lora: bool = False, base_model: str | Path | None = None) -> Path:
    from transformers import AutoConfig

    from omnitune.models.registry import family_for_hf_config
    from omnitune.train.model import load_hf_model

    load, save = Path(load), Path(save)
    ckpt = ckpt_io.resolve_checkpoint(load) if ckpt_io.is_training_checkpoint_root(load) else load
    if not ((ckpt / ".metadata").is_file() or ckpt_io.portable.is_portable(ckpt)):
        raise FileNotFoundError(f"--load {load}: not a training checkpoint (no {ckpt_io.LATEST} and no .metadata)")
    state = ckpt_io.check_checkpoint(ckpt)   # no code from .metadata, no truncated file: before any work
    assets = Path(model_assets or state.get("hf_dir", ""))
    if not (assets / "config.json").is_file():
        raise FileNotFoundError(f"--model-assets {assets}: needs the original HF folder (config.json, tokenizer, "
                                f"processor files)")
    if save.exists() and any(save.iterdir()) and not overwrite:
        raise FileExistsError(f"--save {save} exists and is not empty; pass --overwrite to replace it")
    ckpt_io.check_save_dir(save)
    if (merge_lora or base_model) and "lora" not in state:
        flag = "--merge-lora" if merge_lora else "--load-base-model"
        raise ValueError(f"{flag}: {ckpt} is a full-training checkpoint (no LoRA adapters); remove {flag}")
    config = AutoConfig.from_pretrained(assets, trust_remote_code=False)
    family = family_for_hf_config(config)
    for name in family.folder_extra_files:
        if not (assets / name).is_file():
            raise FileNotFoundError(f"--model-assets {assets}: {name} is missing; a {family.hf_full_class_name} "
                                    f"folder needs it (copy it from the original model folder)")
    adapters_only = "lora" in state and not merge_lora
    if "lora" in state:
        model, names, spec, base = _lora_model(ckpt, state["lora"], family, config, base_model)
        if merge_lora:
            from omnitune.train.lora import merge_adapters
            merge_adapters(model)
    else:
        model = load_hf_model(family, None, config, init_weights=False)
        ckpt_io.load_model_weights_from_dcp(ckpt, model)
    with atomic_dir(save) as tmp:
        if adapters_only:
            from omnitune.train.lora import write_adapter_folder
            copy_assets(assets, Path(tmp))
            (Path(tmp) / "config.json").unlink(missing_ok=True)   # an adapter folder is not a model folder
            write_adapter_folder(model, spec, names, base, Path(tmp), prefix=family.folder_prefix)
        else:
            write_like_original(model, family.folder_prefix or "", assets, Path(tmp))
    return save


# ------------------------------------------------------------------------------------ file copy
def is_weight_file(rel: Path) -> bool:
    """Files of an HF folder that hold (or index) the model weights: replaced, never copied.
    Other ``.pt`` / ``.bin`` files (spk_dict.pt ...) are assets and copied."""
    n = rel.name
    return (n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
            or (n.startswith("pytorch_model") and (n.endswith(".bin") or n.endswith(".bin.index.json"))))


def _lora_model(ckpt: Path, saved: dict, family, config, base_model):
    """The base model of a LoRA checkpoint with its trained adapters on (module paths as in
    training, so the DCP keys match). The base: ``base_model`` (--load-base-model), else the one the checkpoint records."""
    from omnitune.checkpoint.mm_load import is_dcp_release, is_mm_checkpoint, load_mm_weights
    from omnitune.train import lora
    from omnitune.train.model import load_hf_model

    base = Path(base_model or saved["base"])
    flag = "--load-base-model" if base_model else f"the base recorded in {ckpt}"
    if is_mm_checkpoint(base) or is_dcp_release(base):
        model = load_hf_model(family, None, config, init_weights=False)
        load_mm_weights(base, family, model)
    elif (base / "config.json").is_file() and any(base.glob("*.safetensors")):
        model = load_hf_model(family, str(base), config)
    else:
        raise FileNotFoundError(f"{flag} {base}: not an HF folder or mm-convert output; name the base model the "
                                f"adapters were trained on with --load-base-model DIR")
    spec = lora.LoraSpec.from_json(saved)
    lora.apply_lora(model, spec, saved["modules"], seed=0)
    ckpt_io.load_model_weights_from_dcp(ckpt, model, key_filter=lora.is_adapter_key)
    return model, saved["modules"], spec, base


def copy_assets(original: Path, out: Path) -> list[str]:
    """Every non-weight file of ``original`` (subfolders too, hidden folders such as .cache not) into
    ``out``, byte for byte. Returns the relative paths copied."""
    copied = []
    for item in sorted(original.rglob("*")):
        rel = item.relative_to(original)
        if not item.is_file() or is_weight_file(rel) or any(p.startswith(".") for p in rel.parts[:-1]):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item, out / rel)
        copied.append(str(rel))
    return copied


def write_like_original(trainable, prefix: str, original: Path, out: Path) -> None:
    """``out`` = ``original`` with the weights of ``trainable`` (the trained model; Omni: the thinker,
    whose keys go under ``prefix``) in place of its own: same safetensors files, tensor names and
    order; tensors outside ``prefix`` copied bit for bit; every other file copied (copy_assets).

    The trained tensors are named as on disk by the model's own ``save_pretrained`` (staged in a
    hidden subfolder, then streamed tensor by tensor into the final files). When those names are not
    the original folder's (a non-Omni folder saved with another naming), the folder keeps
    save_pretrained's weight files, still with the original's config and other files."""
    from omnitune.convert.stream import SafetensorsIndex

    staging = out / ".trainable"
    trainable.save_pretrained(staging)
    trained = SafetensorsIndex(staging)
    orig = SafetensorsIndex(original)
    try:
        if not orig.keys():
            raise FileNotFoundError(f"--model-assets {original}: no *.safetensors weights; pass the original HF folder")
        rename = {k: (k if k.startswith(prefix) else prefix + k) for k in trained.keys()}
        src_of = {new: old for old, new in rename.items()}
        wanted = {k for k in orig.keys() if k.startswith(prefix)}
        if set(src_of) != wanted:
            diff = sorted(set(src_of) ^ wanted)
            if prefix:
                raise ValueError(f"--model-assets {original}: the trained {prefix.rstrip('.')} and this folder disagree "
                                 f"on {len(diff)} tensor names (e.g. {diff[:3]}); pass the folder training started from")
            _keep_staged_layout(staging, out, diff)
        else:
            _write_layout(trained, orig, src_of, original, out)
        copy_assets(original, out)
    finally:
        trained.close()
        orig.close()
    shutil.rmtree(staging, ignore_errors=True)


def _write_layout(trained, orig, src_of: dict[str, str], original: Path, out: Path) -> None:
    """One output file per original file, same names in the same order; the trained tensor where
    there is one (its shape must be the original's: the copied config.json describes it)."""
    from omnitune.convert.stream import SafetensorsWriter

    total = 0
    flip = set()
    for fname, keys in orig.file_keys.items():
        metas = {}
        for k in keys:
            m = trained.meta(src_of[k]) if k in src_of else orig.meta(k)
            if _transposed_experts(k, m, orig.meta(k)):
                flip.add(k)
                m = m.transpose(1, 2)
            if tuple(m.shape) != tuple(orig.meta(k).shape):
                raise ValueError(f"--model-assets {original}: {k!r} is {tuple(orig.meta(k).shape)} there but "
                                 f"{tuple(m.shape)} in the checkpoint; pass the folder training started from")
            metas[k] = m
            total += m.numel() * m.element_size()
        w = SafetensorsWriter(out / fname, metas, orig.file_meta.get(fname) or {"format": "pt"})
        for k in keys:
            t = trained.read(src_of[k]) if k in src_of else orig.read(k)
            w.write(k, t.transpose(1, 2).contiguous() if k in flip else t)
        w.close()
    _write_index(original, out, orig, total)


def _transposed_experts(key: str, trained, original) -> bool:
    """Stacked MoE experts stored the other way round: transformers 5 keeps Qwen3-VL-MoE's
    ``experts.gate_up_proj`` / ``down_proj`` as [E, out, in] and reads the 4.x layout [E, in, out]
    (the Hub's) by transposing dims 1, 2 when the shapes differ; the export turns them back, so the
    folder keeps the layout its config and its consumers expect."""
    return (".experts." in key and trained.dim() == 3 and tuple(trained.shape) != tuple(original.shape)
            and tuple(trained.transpose(1, 2).shape) == tuple(original.shape))


def _write_index(original: Path, out: Path, orig, total: int) -> None:
    """The original's index, byte for byte when its total size still holds (same dtypes), else the
    same weight map with the new total; none when the original has none."""
    src = original / _INDEX
    if not src.is_file():
        return
    index = json.loads(src.read_text())
    if index.get("metadata", {}).get("total_size") == total:
        shutil.copyfile(src, out / _INDEX)
        return
    index.setdefault("metadata", {})["total_size"] = total
    index["weight_map"] = {k: orig.file_of(k) for k in orig.keys()}
    (out / _INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _keep_staged_layout(staging: Path, out: Path, diff: list[str]) -> None:
    print(f"omnitune: warning: the trained tensor names differ from the original folder's (e.g. {diff[:3]}); "
          f"the export keeps transformers' own weight files", file=sys.stderr)
    for f in staging.iterdir():
        if is_weight_file(Path(f.name)):
            shutil.move(str(f), out / f.name)
