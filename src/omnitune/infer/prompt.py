"""Conversation + media files -> the model inputs, through the training data pipeline.

Inference must see what training saw: the prompt is rendered by the data template training used
(``data.templates``: the same system prompt, placeholders, expansion of every image / video / audio
into its tokens) and the media are decoded and processed by the same code (``data.dataset.
SampleEncoder``: PIL + the image processor, PyAV frame sampling + the video processor, soundfile +
resampling + the Whisper features), with the same data.json preprocess parameters when ``--mm-data``
names the training data.json (else their defaults and the family's template).

A :class:`Conversation` keeps the turns with their media placeholders and the media of the whole
conversation in text order, which is exactly a training sample; its prompt is the sample with an
empty last answer, rendered without that answer (so it ends with the assistant header).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omnitune.data.formats import DataError
from omnitune.data.templates import KINDS, encode, place_media_tags, render
from omnitune.infer.loader import InferError


@dataclass
class Conversation:
    """Turns ({"role", "content"} with media placeholders) and the media files of all turns."""
    system: str | None = None
    turns: list[dict] = field(default_factory=list)
    media: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def add_user(self, template, text: str, media: dict[str, list[str]], where: str) -> None:
        """A user turn with its media: placeholders in ``text`` are used as they are (one per file of
        that kind), else they are prepended (images, videos, audios), as training data does."""
        self.turns.append(user_turn(template, text, media, where))
        for k in KINDS:
            self.media[k].extend(str(p) for p in media.get(k, ()))

    def copy(self) -> "Conversation":
        return Conversation(self.system, list(self.turns), {k: list(v) for k, v in self.media.items()})

    def add_assistant(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.turns


def user_turn(template, text: str, media: dict[str, list[str]], where: str) -> dict:
    """The user message of ``text`` with one placeholder per media file (checked: tags in the text
    must match the files' count per kind; with no tag at all they are prepended)."""
    counts = {k: len(media.get(k, ())) for k in KINDS}
    try:
        return place_media_tags(template, [{"role": "user", "content": text}], counts, where)[0]
    except DataError as e:
        raise InferError(str(e)) from None


def data_config(template: str, mm_data: str | None = None, use_audio_in_video: bool = False):
    """The DataConfig whose template and preprocess parameters inference uses: ``--mm-data``'s
    (the training data.json), else the defaults with the family's template."""
    from omnitune.config.data import BasicParameters, DataConfig, DatasetParam, load_data_config

    if mm_data:
        cfg = load_data_config(mm_data)
    else:   # "dataset" is required by the schema; inference reads no dataset file
        cfg = DataConfig(dataset_param=DatasetParam(basic_parameters=BasicParameters(template=template, dataset="-")))
    attr = cfg.dataset_param.attr   # media columns are what the encoder checks placeholders against
    attr.images, attr.videos, attr.audios = attr.images or "images", attr.videos or "videos", attr.audios or "audios"
    if use_audio_in_video:
        cfg.dataset_param.preprocess_parameters.use_audio_in_video = True
    return cfg


class PromptEncoder:
    """Conversation -> generate() kwargs (input_ids, attention_mask, media tensors) of one prompt."""

    def __init__(self, processor, cfg, sequence_keys=("mm_token_type_ids",)):
        from omnitune.data.dataset import SampleEncoder

        try:
            self.encoder = SampleEncoder(cfg, processor)
        except DataError as e:
            raise InferError(str(e)) from None
        self.template = self.encoder.template
        self.use_audio_in_video = self.encoder.use_audio_in_video
        self.sequence_keys = tuple(sequence_keys)   # per-token inputs the model takes (family.forward_batch_keys)

    def default_system(self) -> str | None:
        return self.template.default_system

    def inputs(self, conv: Conversation, where: str) -> dict:
        """Model inputs of ``conv`` (last turn: the user's) followed by the assistant header.
        Media errors name ``where`` (e.g. ``in.jsonl:3``)."""
        import torch

        enc = self.encoder
        sample = {"messages": conv.messages() + [{"role": "assistant", "content": ""}],
                  "images": conv.media["image"], "videos": conv.media["video"], "audios": conv.media["audio"],
                  "source": where, "index": 0}
        prefix = f"{where}: sample 0"   # how SampleEncoder names a sample in its errors
        try:
            messages, exp, meta = enc.prepare(sample)
            segments = render(enc.template, messages, exp, enable_thinking=enc.enable_thinking)[:-1]
            ids, _ = encode(enc.tokenizer, [segments])[0]
            media = enc.media(meta)
        except DataError as e:
            msg = str(e)
            raise InferError(where + msg[len(prefix):] if msg.startswith(prefix) else msg) from None
        ids = torch.from_numpy(ids.astype("int64"))[None]
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **media}
        if "mm_token_type_ids" in self.sequence_keys:
            out["mm_token_type_ids"] = enc.token_types(ids).long()
        if self.use_audio_in_video and "pixel_values_videos" in out:
            out["use_audio_in_video"] = True
        return out


def check_media(kind: str, path: str, where: str, cfg) -> None:
    """Fail early, before any model is loaded, on a media file that is missing or whose header
    does not decode; ``where`` is how the user gave it (``--video clip.mp4``, ``in.jsonl:3``)."""
    from omnitune.data.audio import audio_length
    from omnitune.data.video import probe_video

    p = Path(path)
    if not p.is_file():
        raise InferError(f"{where}: no such file; give the path of an existing {kind} file")
    pp = cfg.dataset_param.preprocess_parameters
    try:
        if kind == "image":
            from PIL import Image, UnidentifiedImageError
            try:
                with Image.open(p) as img:
                    img.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise InferError(f"{where}: cannot be decoded as an image ({e}); give a JPEG/PNG/WebP file") from None
        elif kind == "video":
            probe_video(str(p), where, pp.video_fps, pp.video_maxlen)
        else:
            audio_length(str(p), where, pp.audio_sampling_rate)
    except DataError as e:
        raise InferError(str(e)) from None
