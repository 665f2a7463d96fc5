"""Training checkpoint (DCP) -> Hugging Face folder that plain ``transformers`` loads.

Weights go through the HF class's own ``save_pretrained`` (safetensors, HF key names); the
processor/tokenizer/chat-template files and generation config come from ``--model-assets`` (the
original HF folder). Written to a temp folder and renamed at the end.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from omnitune.checkpoint import dcp as ckpt_io
from omnitune.fsutil import atomic_dir

# files of an HF folder that are weights or written by save_pretrained itself
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def export_hf(load: str | Path, save: str | Path, model_assets: str | Path | None = None,
              overwrite: bool = False) -> Path:
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
    config = AutoConfig.from_pretrained(assets, trust_remote_code=False)
    family = family_for_hf_config(config)
    model = load_hf_model(family, None, config, init_weights=False)
    ckpt_io.load_model_weights_from_dcp(ckpt, model)
    with atomic_dir(save) as tmp:
        for f in sorted(assets.iterdir()):
            if f.is_file() and f.name not in _SKIP and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        model.save_pretrained(tmp)
    return save
