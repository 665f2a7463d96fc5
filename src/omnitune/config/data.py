"""data.json (SPEC section 4): pydantic models, loaded and validated before anything starts.

Every key of MindSpeed-MM's data.json is accepted; unknown keys anywhere are errors naming the key
path and the file. cache_dir / overwrite_cache steer the preprocessing cache and
preprocessing_num_workers the build's worker processes (omnitune.data.cache); a few accepted keys
have no effect here (use_fast_tokenizer, dataloader_mode, sampler_type). Settings this
version does not implement yet are listed by :func:`unsupported_features`, so the trainer refuses
them at start instead of silently ignoring them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from omnitune.config.errors import load_json_model

TEMPLATES = ("qwen2vl", "qwen2_omni", "qwen3_vl", "qwen3_vl_nothink", "qwen3_omni", "qwen3_omni_nothink")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessParameters(_Strict):
    model_name_or_path: str | None = None     # the original HF folder (processor + config source)
    use_fast_tokenizer: bool = True
    split_special_tokens: bool = False
    image_max_pixels: int = Field(768 * 768, ge=1)
    image_min_pixels: int = Field(32 * 32, ge=0)
    video_max_pixels: int = Field(256 * 256, ge=1)     # per frame, whatever the family's processor
    video_min_pixels: int = Field(16 * 16, ge=0)
    video_fps: float = Field(2.0, gt=0)                # frames sampled per second of video ...
    video_maxlen: int = Field(128, ge=1)               # ... at most this many
    audio_sampling_rate: int = Field(16000, ge=1)      # must equal the feature extractor's rate
    use_audio_in_video: bool = False                   # Omni templates: a video's sound track, interleaved

    @model_validator(mode="after")
    def _min_le_max(self):
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if lo > hi:
                raise ValueError(f"{kind}_min_pixels ({lo}) must be <= {kind}_max_pixels ({hi})")
        return self


class BasicParameters(_Strict):
    template: Literal[TEMPLATES] = "qwen2vl"
    dataset_dir: str = "."                    # base folder for media paths (and dataset files)
    dataset: str                              # "a.json,b.jsonl": comma-separated, no spaces
    cache_dir: str | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    preprocessing_batch_size: int = Field(1000, ge=1)
    preprocessing_num_workers: int | None = Field(None, ge=0)
    max_samples: int | None = Field(None, ge=1)   # per dataset file
    tool_format: str | None = None
    streaming: bool = False
    overwrite_cache: bool = False
    val_dataset: str | None = None
    val_max_samples: int | None = Field(None, ge=1)
    val_rate: float | None = Field(None, gt=0, lt=1)
    cutoff_len: int | None = Field(None, ge=1)    # the smaller of this and --seq-length applies
    packing: bool = False
    enable_thinking: bool | None = None   # reasoning templates (qwen3_vl, qwen3_omni); null means true

    @field_validator("dataset")
    @classmethod
    def _comma_list(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty; give one or more dataset files separated by ','")
        if any(part == "" or part != part.strip() for part in v.split(",")):
            raise ValueError(f"{v!r}: separate several datasets with ',' and no spaces")
        return v


class Attr(_Strict):
    """Column and tag names of the dataset files. Defaults are sharegpt's (as in MindSpeed-MM);
    mllm-format files use messages / role / content / user / assistant."""
    system: str | None = None                 # column holding a per-sample system prompt
    images: str | None = None                 # column holding the image path list
    videos: str | None = None
    audios: str | None = None
    messages: str = "conversations"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str | None = None
    function_tag: str | None = None
    system_tag: str | None = "system"
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
    sampler_type: str = "BaseRandomBatchSampler"
    collate_param: CollateParam = CollateParam()
    pin_memory: bool = False
    shuffle: bool = True
    num_workers: int | None = Field(None, ge=0)


class DataConfig(_Strict):
    dataset_param: DatasetParam
    dataloader_param: DataloaderParam = DataloaderParam()
    _source: str = PrivateAttr("data.json")

    @property
    def source(self) -> str:
        """The file this config was read from, for error messages."""
        return self._source


def load_data_config(path: str | Path) -> DataConfig:
    """Read and validate data.json; raises ConfigError naming the file and the bad key path."""
    p = Path(path)
    cfg = load_json_model(p, DataConfig, "--mm-data")
    cfg._source = str(p)
    return cfg


def unsupported_features(cfg: DataConfig) -> list[str]:
    """Settings of ``cfg`` a later version implements, one message per setting naming its key.

    The trainer refuses to start while this list is non-empty.
    """
    pp, b, a = cfg.dataset_param.preprocess_parameters, cfg.dataset_param.basic_parameters, cfg.dataset_param.attr
    out = []
    from omnitune.data.templates import TEMPLATES as IMPLEMENTED

    if b.template not in IMPLEMENTED:
        out.append(f"basic_parameters.template {b.template!r}: not implemented in this version; "
                   f"known: {sorted(IMPLEMENTED)}")
    if b.packing:
        out.append("basic_parameters.packing: true is not implemented in this version; remove it or set false")
    if b.streaming and b.val_rate is not None:
        out.append("basic_parameters.val_rate cannot split a streamed dataset (it has no known size); with "
                   "streaming: true give a val_dataset instead")
    if b.val_dataset is not None and b.val_rate is not None:
        out.append("basic_parameters.val_dataset and val_rate are both set; use one of them")
    if b.tool_format is not None:
        out.append("basic_parameters.tool_format: tool calls are not implemented in this version; set null")
    if pp.split_special_tokens:
        out.append("preprocess_parameters.split_special_tokens: true is not implemented in this version")
    if a.ranking:
        out.append("attr.ranking: the data side reads preference (DPO) pairs, but the trainer has no DPO loss in "
                   "this version; set false")
    return out
