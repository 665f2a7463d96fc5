"""data.json (every key: docs/reference.md): pydantic models, loaded and validated before anything starts.

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
    model_name_or_path: str | None = Field(None,
        description="the original HF folder: processor (tokenizer, image/video/audio) and config source")
    use_fast_tokenizer: bool = Field(True, description="accepted, no effect (the fast tokenizer is always used)")
    split_special_tokens: bool = Field(False, description="true is refused (not implemented)")
    image_max_pixels: int = Field(768 * 768, ge=1, description="upper bound of an image's resized area (pixels)")
    image_min_pixels: int = Field(32 * 32, ge=0, description="lower bound of an image's resized area (pixels)")
    video_max_pixels: int = Field(256 * 256, ge=1,
        description="upper bound of each video frame's area, whatever the family's processor")
    video_min_pixels: int = Field(16 * 16, ge=0, description="lower bound of each video frame's area")
    video_fps: float = Field(2.0, gt=0, description="frames sampled per second of video")
    video_maxlen: int = Field(128, ge=1, description="at most this many frames per video")
    audio_sampling_rate: int = Field(16000, ge=1,
        description="audio resampled to this rate; must equal the processor's feature extractor")
    use_audio_in_video: bool = Field(False,
        description="Omni templates: a video's sound track, interleaved with its frames")

    @model_validator(mode="after")
    def _min_le_max(self):
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if lo > hi:
                raise ValueError(f"{kind}_min_pixels ({lo}) must be <= {kind}_max_pixels ({hi})")
        return self


class BasicParameters(_Strict):
    template: Literal[TEMPLATES] = Field("qwen2vl",
        description="chat template; must be one of the model family's (table below)")
    dataset_dir: str = Field(".", description="base folder for media paths (and dataset files)")
    dataset: str = Field(description='dataset files, comma-separated without spaces ("a.json,b.jsonl"); '
                                     'relative to dataset_dir')
    cache_dir: str | None = Field(None,
        description="preprocessing cache folder (reused by the next run with the same inputs); null: no cache")
    train_on_prompt: bool = Field(False, description="also train on the prompt (user/system) turns")
    mask_history: bool = Field(False, description="train only the last answer of each conversation")
    preprocessing_batch_size: int = Field(1000, ge=1, description="samples per tokenizer call while building")
    preprocessing_num_workers: int | None = Field(None, ge=0,
        description="processes that build the dataset (at most one per available CPU)")
    max_samples: int | None = Field(None, ge=1, description="per dataset file: read at most this many samples")
    tool_format: str | None = Field(None, description="tool calls; only null (not implemented)")
    streaming: bool = Field(False,
        description="read, tokenize and decode samples lazily during training (position saved in checkpoints)")
    overwrite_cache: bool = Field(False, description="rebuild the cache entry once")
    val_dataset: str | None = Field(None,
        description="validation files (comma-separated), see --eval-interval / --eval-iters")
    val_max_samples: int | None = Field(None, ge=1, description="cap of the validation samples")
    val_rate: float | None = Field(None, gt=0, lt=1,
        description="fraction of the training set split off for validation (map-style only)")
    cutoff_len: int | None = Field(None, ge=1,
        description="length limit; the smaller of this and --seq-length applies")
    packing: bool = Field(False,
        description="pack several samples per row of --seq-length tokens (own positions, block-diagonal attention); "
                    "micro/global batch sizes then count rows")
    enable_thinking: bool | None = Field(None,
        description="reasoning templates (qwen3_vl, qwen3_omni): false removes thoughts; null means true")

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
    system: str | None = Field(None, description="column holding a per-sample system prompt")
    images: str | None = Field(None, description="column holding the image path list")
    videos: str | None = Field(None, description="column holding the video path list")
    audios: str | None = Field(None, description="column holding the audio path list")
    messages: str = Field("conversations",
        description="column holding the conversation (sharegpt: conversations; mllm: messages)")
    role_tag: str = Field("from", description="key of a turn's role")
    content_tag: str = Field("value", description="key of a turn's text")
    user_tag: str = Field("human", description="role value of user turns")
    assistant_tag: str = Field("gpt", description="role value of assistant turns")
    observation_tag: str | None = Field(None, description="role value of tool-result turns")
    function_tag: str | None = Field(None, description="role value of function-call turns")
    system_tag: str | None = Field("system", description="role value of system turns")
    ranking: bool = Field(False, description="preference pairs: the run trains DPO (the --dpo-* flags)")
    chosen: str | None = Field(None, description="column of the chosen answer (ranking)")
    rejected: str | None = Field(None, description="column of the rejected answer (ranking)")


class DatasetParam(_Strict):
    dataset_type: Literal["huggingface"] = Field("huggingface", description="only huggingface")
    preprocess_parameters: PreprocessParameters = PreprocessParameters()
    basic_parameters: BasicParameters
    attr: Attr = Attr()


class CollateParam(_Strict):
    model_name: str | None = Field(None, description="accepted, no effect")
    ignore_pad_token_for_loss: bool = Field(True, description="accepted (padding is never trained)")


class DataloaderParam(_Strict):
    dataloader_mode: str = Field("sampler", description="accepted, no effect")
    drop_last: bool = Field(True, description="drop the last incomplete global batch of an epoch")
    sampler_type: str = Field("BaseRandomBatchSampler",
        description="accepted, no effect (a resumable seeded micro-batch sampler is used)")
    collate_param: CollateParam = CollateParam()
    pin_memory: bool = Field(False, description="pinned host memory for batches (accelerators only)")
    shuffle: bool = Field(True, description="shuffle samples each epoch (seeded by --seed)")
    num_workers: int | None = Field(None, ge=0, description="DataLoader workers; overrides --num-workers")


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
    if b.packing and a.ranking:
        out.append("basic_parameters.packing: true does not apply to preference pairs (attr.ranking: a pair is "
                   "two rows); set packing false for DPO")
    if b.streaming and b.val_rate is not None:
        out.append("basic_parameters.val_rate cannot split a streamed dataset (it has no known size); with "
                   "streaming: true give a val_dataset instead")
    if b.val_dataset is not None and b.val_rate is not None:
        out.append("basic_parameters.val_dataset and val_rate are both set; use one of them")
    if b.tool_format is not None:
        out.append("basic_parameters.tool_format: tool calls are not implemented in this version; set null")
    if pp.split_special_tokens:
        out.append("preprocess_parameters.split_special_tokens: true is not implemented in this version")
    return out
