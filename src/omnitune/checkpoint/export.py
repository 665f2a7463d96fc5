"""Training checkpoint (DCP) -> Hugging Face folder that plain ``transformers`` loads.

Weights go through the HF class's own ``save_pretrained`` (safetensors, HF key names); the
processor/tokenizer/chat-template files and generation config come from ``--model-assets`` (the
original HF folder). Written to a temp folder and renamed at the end.

Omni families train the thinker only; their export is a FULL folder again: the trained
``thinker.*`` tensors plus every other tensor (talker, vocoder) copied untouched from the original
folder, the original config.json and the family's extra files (Qwen2.5-Omni: spk_dict.pt).

A LoRA checkpoint (adapters only) exports either as a peft adapter folder for the base model
(adapter_config.json + adapter_model.safetensors, the processor files beside them), or with
``merge_lora`` as a full HF folder: the base weights with the adapters merged in by peft.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from omnitune.checkpoint import dcp as ckpt_io
from omnitune.fsutil import atomic_dir

# files of an HF folder that are weights or written by save_pretrained itself
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_INDEX = "model.safetensors.index.json"


def export_hf(load: str | Path, save: str | Path, model_assets: str | Path | None = None,
              overwrite: bool = False, merge_lora: bool = False, base_model: str | Path | None = None) -> Path:
    from transformers import AutoConfig

    from omnitune.models.registry import family_for_hf_config
    from omnitune.train.model import load_hf_model

    load, save = Path(load), Path(save)
    ckpt = ckpt_io.resolve_checkpoint(load) if ckpt_io.is_training_checkpoint_root(load) else load
    if not (ckpt / ".metadata").is_file():
        raise FileNotFoundError(f"--load {load}: not a training checkpoint (no {ckpt_io.LATEST} and no .metadata)")
    state = ckpt_io.read_trainer_state(ckpt)
    assets = Path(model_assets or state.get("hf_dir", ""))
    if not (assets / "config.json").is_file():
        raise FileNotFoundError(f"--model-assets {assets}: needs the original HF folder (config.json, tokenizer, "
                                f"processor files)")
    if save.exists() and any(save.iterdir()) and not overwrite:
        raise FileExistsError(f"--save {save} exists and is not empty; pass --overwrite to replace it")
    if (merge_lora or base_model) and "lora" not in state:
        flag = "--merge-lora" if merge_lora else "--load-base-model"
        raise ValueError(f"{flag}: {ckpt} is a full-training checkpoint (no LoRA adapters); remove {flag}")
    config = AutoConfig.from_pretrained(assets, trust_remote_code=False)
    family = family_for_hf_config(config)
    if "lora" in state:
        model, names, spec, base = _lora_model(ckpt, state["lora"], family, config, base_model)
        if merge_lora:
            from omnitune.train.lora import merge_adapters
            merge_adapters(model)
    else:
        model = load_hf_model(family, None, config, init_weights=False)
        ckpt_io.load_model_weights_from_dcp(ckpt, model)
    with atomic_dir(save) as tmp:
        for f in sorted(assets.iterdir()):
            if f.is_file() and f.name not in _SKIP and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        for name in family.folder_extra_files:
            if not (assets / name).is_file():
                raise FileNotFoundError(f"--model-assets {assets}: {name} is missing; a {family.hf_full_class_name} "
                                        f"folder needs it (copy it from the original model folder)")
            shutil.copy2(assets / name, tmp / name)
        if "lora" in state and not merge_lora:
            from omnitune.train.lora import write_adapter_folder
            (Path(tmp) / "config.json").unlink(missing_ok=True)   # an adapter folder is not a model folder
            write_adapter_folder(model, spec, names, base, Path(tmp), prefix=family.folder_prefix)
        elif family.folder_prefix:
            write_full_folder(model, family.folder_prefix, assets, Path(tmp))
        else:
            model.save_pretrained(tmp)
    return save


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


def _weight_files(folder: Path) -> list[tuple[Path, list[str]]]:
    """(safetensors file, its keys) of an HF folder, sharded or not."""
    from safetensors import safe_open

    index = folder / _INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    out = []
    for f in files:
        with safe_open(str(f), "pt") as s:
            out.append((f, list(s.keys())))
    return out


def write_full_folder(trainable, prefix: str, original: Path, out: Path) -> None:
    """Weights of a full Omni folder in ``out``: ``trainable`` (the thinker, saved by its own
    save_pretrained, its keys put under ``prefix``) + every tensor of ``original`` outside ``prefix``,
    copied bit for bit; the original config.json. Shard per source file, with an index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    staging = out / ".trainable"
    # small shards: each is read back whole below, while the trained model is still in memory
    trainable.save_pretrained(staging, max_shard_size="2GB")
    # (file, {name in that file: name in the full folder}); the thinker saved on its own names its
    # tensors without the prefix (or with it, when loaded from a full folder): add it where missing
    sources: list[tuple[Path, dict[str, str]]] = []
    for f, keys in _weight_files(staging):
        sources.append((f, {k: k if k.startswith(prefix) else prefix + k for k in keys}))
    trained = {v for _, names in sources for v in names.values()}
    original_keys = set()
    for f, keys in _weight_files(original):
        original_keys |= {k for k in keys if k.startswith(prefix)}
        rest = [k for k in keys if not k.startswith(prefix)]
        if rest:
            sources.append((f, {k: k for k in rest}))
    if trained != original_keys:
        diff = sorted(trained ^ original_keys)
        raise RuntimeError(f"the trained {prefix.rstrip('.')} and {original} disagree on {len(diff)} tensor names, "
                           f"e.g. {diff[:3]}: is --model-assets the folder training started from?")
    weight_map, total = {}, 0
    n = len(sources)
    for i, (f, names) in enumerate(sources, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        with safe_open(str(f), "pt") as s:
            tensors = {new: s.get_tensor(old) for old, new in names.items()}
            meta = s.metadata() or {}
        save_file(tensors, str(out / name), metadata={"format": meta.get("format", "pt")})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    (out / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                         indent=2, sort_keys=True))
    shutil.copy2(original / "config.json", out / "config.json")
    shutil.rmtree(staging)
