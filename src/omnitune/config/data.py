"""data.json (SPEC section 4): pydantic models, loaded and validated before anything starts.

Unknown keys anywhere are errors naming the key path and the file. Features of data.json that this
version does not implement yet are listed by :func:`unsupported_features` so the trainer refuses
them at start instead of ignoring them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from omnitune.config.errors import ConfigError, format_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessParameters(_Strict):
    model_name_or_path: str | None = None
    use_fast_tokenizer: bool = True
    split_special_tokens: bool = False
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    audio_sampling_rate: int = 16000
    use_audio_in_video: bool = False


class BasicParameters(_Strict):
    template: Literal["qwen2vl", "qwen2_omni", "qwen3_vl", "qwen3_vl_nothink", "qwen3_omni",
                      "qwen3_omni_nothink"] = "qwen2vl"
    dataset_dir: str = "."
    dataset: str
    cache_dir: str | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    preprocessing_batch_size: int = 1000
    preprocessing_num_workers: int | None = None
    max_samples: int | None = None
    tool_format: str | None = None
    streaming: bool = False
    overwrite_cache: bool = False
    val_dataset: str | None = None
    val_max_samples: int | None = None
    val_rate: float | None = None
    cutoff_len: int | None = None
    packing: bool = False
    enable_thinking: bool | None = None

    @field_validator("dataset")
    @classmethod
    def _no_spaces(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        if any(" " in part or part == "" for part in v.split(",")):
            raise ValueError(f"{v!r}: separate several datasets with ',' and no spaces")
        return v

    @field_validator("max_samples")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be >= 1 (or null for all)")
        return v


class Attr(_Strict):
    system: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    messages: str = "messages"
    role_tag: str = "role"
    content_tag: str = "content"
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    observation_tag: str | None = None
    function_tag: str | None = None
    system_tag: str | None = None
    ranking: bool = False
    chosen: str | None = None
    rejected: str | None = None


class DatasetParam(_Strict):
    dataset_type: Literal["huggingface"] = "huggingface"
    preprocess_parameters: PreprocessParameters = PreprocessParameters()
    basic_parameters: BasicParameters
    attr: Attr = Attr()


class CollateParam(_Strict):
    model_name: str | None = None
    ignore_pad_token_for_loss: bool = True


class DataloaderParam(_Strict):
    dataloader_mode: str = "sampler"
    drop_last: bool = True
    sampler_type: str = "stateful_distributed_sampler"
    collate_param: CollateParam = CollateParam()
    pin_memory: bool = False
    shuffle: bool = True
    num_workers: int | None = None


class DataConfig(_Strict):
    dataset_param: DatasetParam
    dataloader_param: DataloaderParam = DataloaderParam()
    #: the file this came from (set by load_data_config), used in error messages
    source: str = "data.json"


def load_data_config(path: str | Path) -> DataConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--mm-data: file not found: {p}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    if isinstance(raw, dict):
        raw.pop("source", None)
    try:
        cfg = DataConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(p))) from None
    cfg.source = str(p)
    return cfg


def unsupported_features(cfg: DataConfig) -> list[str]:
    """data.json settings a later version implements; each message names the key."""
    b, a = cfg.dataset_param.basic_parameters, cfg.dataset_param.attr
    out = []
    if b.template != "qwen2vl":
        out.append(f"basic_parameters.template {b.template!r}: only 'qwen2vl' is implemented in this version")
    for key, on in (("streaming", b.streaming), ("packing", b.packing)):
        if on:
            out.append(f"basic_parameters.{key}: true is not implemented in this version")
    for key in ("val_dataset", "val_rate"):
        if getattr(b, key) is not None:
            out.append(f"basic_parameters.{key}: validation sets are not implemented in this version")
    for key in ("videos", "audios", "chosen", "rejected"):
        if getattr(a, key) is not None:
            out.append(f"attr.{key}: not implemented in this version (images + text only)")
    if a.ranking:
        out.append("attr.ranking: DPO pairs are not implemented in this version")
    return out
