"""The model to generate with: an HF folder (exported or original) or a training save dir.

An HF folder is loaded as training loads it (``family.load_pretrained``): for the Omni families
only the thinker is built and only its ``thinker.*`` tensors are read, so the talker and the
vocoder never leave the disk (text generation does not use them).

A training save dir (``--save`` of ``omnitune train``: ``latest_checkpointed_iteration.txt`` +
DCP ``iter_*``, or one ``iter_*`` folder) holds weights only. The model is built from the original
HF folder's config (``--model-assets``, else the ``hf_dir`` training recorded in
``trainer_state.json``) and the DCP weights are read into it, with the same checkpoint functions
``omnitune export`` uses, so generating on a save dir gives what generating on its export gives.
The processor (tokenizer, image/video processors, feature extractor) always comes from the HF
folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class InferError(ValueError):
    """A bad inference input (model folder, flag, media file, batch line); the message names it."""


@dataclass
class Loaded:
    family: object        # models.base.ModelFamily
    model: torch.nn.Module
    processor: object
    assets: Path          # the HF folder the processor and config came from
    checkpoint: Path | None  # the DCP iteration folder when the weights came from a training save


def _checkpoint_of(path: Path) -> Path | None:
    """The DCP iteration folder ``path`` names (a save dir or an ``iter_*`` folder), else None."""
    from omnitune.checkpoint import dcp as ckpt_io

    if ckpt_io.is_training_checkpoint_root(path):
        try:
            return ckpt_io.resolve_checkpoint(path)
        except ValueError:
            text = (path / ckpt_io.LATEST).read_text().strip()
            raise InferError(f"--model {path}: {ckpt_io.LATEST} holds {text!r}, not an iteration number; "
                             f"write the number of an existing iter_* folder into it") from None
        except FileNotFoundError as e:
            raise InferError(f"--model {path}: {e}") from None
    if (path / ".metadata").is_file():
        return path
    return None


def resolve(model: str | Path, model_assets: str | Path | None = None) -> tuple[Path, Path | None]:
    """(HF folder for config + processor, DCP checkpoint folder or None) of ``--model``."""
    from omnitune.checkpoint import dcp as ckpt_io

    path = Path(model)
    if not path.is_dir():
        raise InferError(f"--model {model}: no such folder; give an HF model folder or a training --save folder")
    ckpt = _checkpoint_of(path)
    if ckpt is None:
        if not (path / "config.json").is_file():
            raise InferError(f"--model {model}: no config.json (expected an HF folder, e.g. from omnitune export) "
                             f"and no {ckpt_io.LATEST} (a training save dir); give one of those")
        if model_assets:
            raise InferError(f"--model-assets {model_assets}: only for a training save dir; --model {model} is an "
                             f"HF folder and brings its own config and processor, drop --model-assets")
        return path, None
    if model_assets:
        assets, flag = Path(model_assets), "--model-assets"
    else:
        recorded = ckpt_io.read_trainer_state(ckpt).get("hf_dir")
        if not recorded:
            raise InferError(f"--model {model}: the checkpoint records no original HF folder; pass "
                             f"--model-assets ORIGINAL_HF_FOLDER")
        assets, flag = Path(recorded), f"--model {model}: the recorded original HF folder"
    if not (assets / "config.json").is_file():
        raise InferError(f"{flag} {assets}: no config.json; pass --model-assets with the HF folder training "
                         f"started from")
    return assets, ckpt


def load(model: str | Path, model_assets: str | Path | None = None, dtype=torch.float32) -> Loaded:
    """Build the trainable model (Omni: the thinker) with its weights, in eval mode, and its processor."""
    from transformers import AutoConfig, AutoProcessor

    from omnitune.checkpoint import dcp as ckpt_io
    from omnitune.models.registry import family_for_hf_config
    from omnitune.train.model import load_hf_model

    assets, ckpt = resolve(model, model_assets)
    config = AutoConfig.from_pretrained(assets, trust_remote_code=False)
    try:
        family = family_for_hf_config(config)
    except ValueError as e:
        raise InferError(f"--model {model}: {e}; omnitune generates with the Qwen families it trains") from None
    if ckpt is None:
        net = family.load_pretrained(assets, dtype=dtype)
    else:
        net = load_hf_model(family, None, config, init_weights=False)
        ckpt_io.load_model_weights_from_dcp(ckpt, net)
        net = net.to(dtype)
    for c in (net.config, getattr(net.config, "text_config", None)):
        if c is not None:
            c.use_cache = True   # training turns the KV cache off; generation wants it
    net.eval()
    processor = AutoProcessor.from_pretrained(assets, trust_remote_code=False)
    return Loaded(family, net, processor, assets, ckpt)
