"""SFT / preference dataset: normalized samples -> token ids, labels and media tensors.

Build time (once): read and check every conversation, size every image from its header and every
video from its container header (no frame decoded), measure every audio, so each placeholder's token
count is known; render with the template and tokenize in batches; apply the length limit. Ids and
labels of all samples live in two flat int32 arrays, so a large dataset costs little memory and
DataLoader workers share it without copy-on-write growth. Item time: decode and process the sample's
media with the HF processors and check the grids equal the build-time ones.

:class:`SampleEncoder` is the per-sample encoding (sample -> ids, labels, media metadata) and the
item-time media loading, usable on its own (caching, streaming).

Length limit = min(seq_length, cutoff_len). A longer sample is cut in its text only when no media
token would be cut; otherwise it is dropped and counted (a media token cut out of sync with its
media cannot train). Samples left with no trained token are dropped too. Both are reported once.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from omnitune.config.data import DataConfig
from omnitune.data.audio import audio_features, audio_length, feature_frames, load_audio
from omnitune.data.formats import DataError
from omnitune.data.media import image_grid, load_images
from omnitune.data.templates import (IGNORE_INDEX, KINDS, audio_token_count, encode, expand_audio, expand_image,
                                     expand_video, get_template, place_media_tags, render)
from omnitune.data.video import VideoInfo, decode_frames, probe_video, process_videos, video_grid

log = logging.getLogger(__name__)

Grid = tuple[int, int, int]


class MediaMeta(NamedTuple):
    """What item time needs to load a sample's media, all known at build time."""
    where: str                                # "<file>: sample <i>", for errors
    images: tuple[str, ...]
    image_grids: tuple[Grid, ...]
    videos: tuple[VideoInfo, ...]
    video_grids: tuple[Grid, ...]
    audios: tuple[str, ...]
    audio_samples: tuple[int, ...]            # length at the feature extractor's rate
    video_audio_samples: tuple[int, ...]      # use_audio_in_video: each video's audio track length
    audio_order: tuple[tuple[str, int], ...]  # ("audio", i) / ("video", j) in text order: feature order

    @property
    def has_media(self) -> bool:
        return bool(self.images or self.videos or self.audios)

    def to_json(self) -> dict:
        d = self._asdict()
        d["videos"] = [dataclasses.asdict(v) for v in self.videos]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "MediaMeta":
        def tup(x):
            return tuple(tup(v) for v in x) if isinstance(x, list) else x
        videos = tuple(VideoInfo(**{k: tup(v) for k, v in info.items()}) for info in d["videos"])
        return cls(**{k: (videos if k == "videos" else tup(v)) for k, v in d.items()})


class SampleEncoder:
    """Per-sample encoding for one data.json + HF processor.

    ``encode(samples)`` -> [(ids, labels, meta)] (preference samples: ((chosen ids, labels),
    (rejected ids, labels), meta)), with no length limit applied; ``media(meta)`` -> the media
    tensors of one sample; ``token_types(ids)`` -> mm_token_type_ids (1 image, 2 video, 3 audio pads).
    """

    def __init__(self, cfg: DataConfig, processor):
        pp, bp = cfg.dataset_param.preprocess_parameters, cfg.dataset_param.basic_parameters
        self.cfg, self.processor = cfg, processor
        self.template = t = get_template(bp.template)
        self.train_on_prompt, self.mask_history = bp.train_on_prompt, bp.mask_history
        self.enable_thinking = bp.enable_thinking
        self.ranking = cfg.dataset_param.attr.ranking
        self.tokenizer = tok = processor.tokenizer
        self.image_processor = getattr(processor, "image_processor", None)
        self.video_processor = getattr(processor, "video_processor", None)
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        self.min_pixels, self.max_pixels = max(pp.image_min_pixels, 1), pp.image_max_pixels  # see media.py
        self.video_min_pixels, self.video_max_pixels = max(pp.video_min_pixels, 1), pp.video_max_pixels
        self.video_fps, self.video_maxlen = pp.video_fps, pp.video_maxlen
        self.use_audio_in_video = pp.use_audio_in_video
        if self.use_audio_in_video and t.audio_in_video is None:
            raise DataError(f"{cfg.source}: preprocess_parameters.use_audio_in_video is true but template "
                            f"{bp.template!r} has no audio; use an Omni template or set it false")
        if self.feature_extractor is not None and pp.audio_sampling_rate != self.feature_extractor.sampling_rate:
            raise DataError(f"{cfg.source}: preprocess_parameters.audio_sampling_rate {pp.audio_sampling_rate} differs "
                            f"from the processor's feature extractor rate {self.feature_extractor.sampling_rate}")
        self.audio_rate = pp.audio_sampling_rate
        self.position_id_per_seconds = getattr(processor, "position_id_per_seconds", 25)
        self.seconds_per_chunk = getattr(processor, "seconds_per_chunk", 2.0)
        names = set(getattr(processor, "model_input_names", ()))
        self.video_time_key = next((k for k in ("second_per_grid_ts", "video_second_per_grid") if k in names), None)
        unknown = [x for x in t.reserved_tokens if tok.convert_tokens_to_ids(x) in (None, tok.unk_token_id)]
        mismatched = [(kind, getattr(processor, f"{kind}_token"), t.media(kind).pad) for kind in KINDS
                      if t.media(kind) is not None and getattr(processor, f"{kind}_token", None) not in
                      (None, t.media(kind).pad)]
        if unknown or mismatched:
            found = ", ".join([f"{x} is not a token of its tokenizer" for x in unknown] +
                              [f"its {k} token is {a}, the template's {b}" for k, a, b in mismatched])
            raise DataError(f"{cfg.source}: basic_parameters.template {bp.template!r} does not fit the model's "
                            f"processor ({found}); use the template of that model family")
        types = {}
        for code, kind in enumerate(KINDS, start=1):
            if t.media(kind) is not None:
                types[tok.convert_tokens_to_ids(t.media(kind).pad)] = code
        self._type_ids = np.array(list(types), dtype=np.int64)
        self._type_codes = np.array(list(types.values()), dtype=np.int32)
        self.media_token_ids = np.array([tok.convert_tokens_to_ids(x) for x in t.reserved_tokens])
        self._tag_re = re.compile("|".join(re.escape(t.media(k).placeholder) for k in KINDS
                                           if t.media(k) is not None))
        self._kind_of = {t.media(k).placeholder: k for k in KINDS if t.media(k) is not None}

    # ------------------------------------------------------------------ build time
    def _need(self, attr: str, kind: str, where: str):
        obj = getattr(self, attr)
        if obj is None:
            raise DataError(f"{where}: has {kind}s but the processor has no {attr}; use the processor of a model "
                            f"that reads {kind}s (preprocess_parameters.model_name_or_path)")
        return obj

    def _audio_tokens(self, lengths: list[int], whats: list[str], where: str) -> list[int]:
        """Audio token counts of a sample's audios (all extracted together, see audio.feature_frames)."""
        t = self.template
        fe = self._need("feature_extractor", "audio", where)
        counts = [audio_token_count(t.audio_rule, f)
                  for f in feature_frames(lengths, fe, t.audio_rule == "qwen2_omni")]
        for n, n_samples, what in zip(counts, lengths, whats):
            if n < 1:
                raise DataError(f"{where}: {what} is too short ({n_samples} samples) to give an audio token")
        return counts

    def prepare(self, s: dict) -> tuple[list[dict], dict, MediaMeta]:
        """Check a normalized sample's media, size them and expand its placeholders.
        Returns (messages with placeholders placed, {kind: [expansions]}, meta)."""
        t, where = self.template, f"{s['source']}: sample {s['index']}"
        attr = self.cfg.dataset_param.attr
        for kind in KINDS:
            column = getattr(attr, kind + "s")
            ph = t.media(kind).placeholder if t.media(kind) is not None else f"<{kind}>"
            if not s.get(kind + "s") and column is None and any(ph in m["content"] for m in s["messages"]):
                raise DataError(f"{where}: has {ph} tags but data.json attr.{kind}s is not set")
        images, videos, audios = s.get("images", []), s.get("videos", []), s.get("audios", [])
        messages = place_media_tags(t, s["messages"],
                                    {"image": len(images), "video": len(videos), "audio": len(audios)}, where)
        exp = {"image": [], "video": [], "audio": []}
        image_grids = []
        if images:
            ip = self._need("image_processor", "image", where)
            for p in images:
                g = image_grid(p, where, ip, self.min_pixels, self.max_pixels)
                image_grids.append(g)
                exp["image"].append(expand_image(t, g, ip.merge_size))
        infos, video_grids = [], []
        if videos:
            vp = self._need("video_processor", "video", where)
            for p in videos:
                info = probe_video(p, where, self.video_fps, self.video_maxlen)
                infos.append(info)
                video_grids.append(video_grid(info, where, vp, self.video_min_pixels, self.video_max_pixels,
                                              t.video_pixels_per))
        order, seen = [], {"image": 0, "video": 0, "audio": 0}
        for m in messages:
            for tag in self._tag_re.findall(m["content"]):
                kind = self._kind_of[tag]
                if kind == "audio" or (kind == "video" and self.use_audio_in_video):
                    order.append((kind, seen[kind]))
                seen[kind] += 1
        audio_samples = [audio_length(p, where, self.audio_rate) for p in audios]
        video_audio = [audio_length(p, where, self.audio_rate, from_video=True) for p in videos] \
            if self.use_audio_in_video else []
        tokens = {}
        if order:
            lengths = [audio_samples[i] if k == "audio" else video_audio[i] for k, i in order]
            whats = [f"audio {audios[i]}" if k == "audio" else f"the audio track of video {videos[i]}"
                     for k, i in order]
            tokens = dict(zip(order, self._audio_tokens(lengths, whats, where)))
        for j, (info, g) in enumerate(zip(infos, video_grids)):
            vp = self.video_processor
            exp["video"].append(expand_video(
                t, g, vp.merge_size, indices=info.indices, fps=info.fps, temporal_patch_size=vp.temporal_patch_size,
                second_per_grid=vp.temporal_patch_size / info.sample_fps, audio_tokens=tokens.get(("video", j)),
                position_id_per_seconds=self.position_id_per_seconds, seconds_per_chunk=self.seconds_per_chunk))
        exp["audio"] = [expand_audio(t, tokens[("audio", i)]) for i in range(len(audios))]
        meta = MediaMeta(where, tuple(images), tuple(image_grids), tuple(infos), tuple(video_grids), tuple(audios),
                         tuple(audio_samples), tuple(video_audio), tuple(order))
        return messages, exp, meta

    def encode(self, samples: list[dict]) -> list[tuple]:
        """Encode a batch of normalized samples (one tokenizer call)."""
        rendered, metas, pairs = [], [], []
        for s in samples:
            messages, exp, meta = self.prepare(s)
            if "chosen" in s:
                for answer in (s["chosen"], s["rejected"]):
                    rendered.append(render(self.template, messages + [{"role": "assistant", "content": answer}],
                                           exp, self.train_on_prompt, self.mask_history, self.enable_thinking))
                pairs.append(True)
            else:
                rendered.append(render(self.template, messages, exp, self.train_on_prompt, self.mask_history,
                                       self.enable_thinking))
                pairs.append(False)
            metas.append(meta)
        encoded = iter(encode(self.tokenizer, rendered))
        out = []
        for meta, pair in zip(metas, pairs):
            if pair:
                out.append((next(encoded), next(encoded), meta))
            else:
                ids, labels = next(encoded)
                out.append((ids, labels, meta))
        return out

    # ------------------------------------------------------------------ item time
    def token_types(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ids.shape, dtype=torch.int32)
        for tok_id, code in zip(self._type_ids.tolist(), self._type_codes.tolist()):
            out[ids == tok_id] = code
        return out

    def media(self, meta: MediaMeta) -> dict:
        """The media tensors of one sample, keyed as the HF processor names them."""
        item, where = {}, meta.where
        if meta.images:
            pixel_values, grid = load_images(list(meta.images), where, self.image_processor,
                                             self.min_pixels, self.max_pixels)
            if grid.tolist() != [list(g) for g in meta.image_grids]:
                raise DataError(f"{where}: image grid {grid.tolist()} differs from the one computed at build time "
                                f"{list(meta.image_grids)} (image changed on disk?)")
            item["pixel_values"], item["image_grid_thw"] = pixel_values, grid
        if meta.videos:
            frames = [decode_frames(info, where) for info in meta.videos]
            out = process_videos(list(meta.videos), frames, self.video_processor, self.video_min_pixels,
                                 self.video_max_pixels, self.template.video_pixels_per)
            if out["video_grid_thw"].tolist() != [list(g) for g in meta.video_grids]:
                raise DataError(f"{where}: video grid {out['video_grid_thw'].tolist()} differs from the one computed "
                                f"at build time {list(meta.video_grids)} (video changed on disk?)")
            item.update(out)
            if self.video_time_key:
                tps = self.video_processor.temporal_patch_size
                item[self.video_time_key] = torch.tensor([tps / info.sample_fps for info in meta.videos])
        if meta.audio_order:
            waves = []
            for kind, i in meta.audio_order:
                if kind == "audio":
                    w, n = load_audio(meta.audios[i], where, self.audio_rate), meta.audio_samples[i]
                else:
                    w, n = load_audio(meta.videos[i].path, where, self.audio_rate, True), meta.video_audio_samples[i]
                if len(w) != n:
                    raise DataError(f"{where}: {kind} {i} has {len(w)} audio samples, {n} at build time "
                                    f"(file changed on disk?)")
                waves.append(w)
            item["input_features"], item["feature_attention_mask"] = audio_features(
                waves, self.feature_extractor, self.template.audio_rule == "qwen2_omni")
        return item


class SFTDataset(Dataset):
    """Map-style dataset of tokenized conversations.

    Item keys: input_ids, labels (long [L]), attention_mask (long [L], ones), mm_token_type_ids
    (int32 [L]: 1 image, 2 video, 3 audio pad tokens), and the sample's media tensors keyed as the
    HF processor names them (pixel_values + image_grid_thw; pixel_values_videos + video_grid_thw
    [+ second_per_grid_ts or video_second_per_grid]; input_features [n_audio, mels, frames] +
    feature_attention_mask). Preference data (attr.ranking): chosen_* and rejected_* versions of
    input_ids, labels, attention_mask, mm_token_type_ids, with the media once.
    Attributes: ``media[i]`` (:class:`MediaMeta` of sample i), ``max_length``, ``encoder``, and the
    build counts ``num_truncated``, ``num_dropped_media``, ``num_dropped_untrained``.
    """

    def __init__(self, cfg: DataConfig, processor, seq_length: int, *, build: bool = True):
        bp = cfg.dataset_param.basic_parameters
        self.cfg = cfg
        self.encoder = enc = SampleEncoder(cfg, processor)
        self.template = enc.template
        self.paired = enc.ranking
        self._media_token_ids = enc.media_token_ids
        self.max_length = min(seq_length, bp.cutoff_len or seq_length)
        self.num_truncated = self.num_dropped_media = self.num_dropped_untrained = 0
        if not build:  # an encoder only (streaming: omnitune.data.streaming)
            return

        # Build (or reuse the cache_dir entry): see omnitune.data.cache.
        from omnitune.data.cache import build_or_load
        state = build_or_load(self, cfg, processor)
        self.input_ids, self.labels, self.offsets = state.input_ids, state.labels, state.offsets
        self.media: list[MediaMeta] = state.media
        self.num_truncated, self.num_dropped_media, self.num_dropped_untrained = state.counts
        if not self.media:
            raise DataError(f"{cfg.source}: no usable sample out of {state.num_samples}: "
                            f"{self.num_dropped_media} would have media cut at the length limit "
                            f"{self.max_length}, {self.num_dropped_untrained} have no trained token")

    def encode_samples(self, samples: list[dict]) -> list:
        """Encode normalized samples (one tokenizer call). Per sample: (sequences, truncated, meta)
        with sequences = [(ids int32, labels int32)] (preference pairs: chosen, rejected), or the drop
        reason "media" / "untrained". Pure: no state changes, so it can run in worker processes
        (omnitune.data.cache)."""
        out = []
        for enc_sample in self.encoder.encode(samples):
            seqs, meta = enc_sample[:-1], enc_sample[-1]
            if not self.paired:
                seqs = (seqs,)
            fitted = [self._fit(ids.astype(np.int32), labels.astype(np.int32)) for ids, labels in seqs]
            reason = next((f for f in fitted if isinstance(f, str)), None)
            if reason is not None:
                out.append(reason)
            else:
                out.append(([(ids, labels) for ids, labels, _ in fitted], any(cut for *_, cut in fitted), meta))
        return out

    def _fit(self, ids: np.ndarray, labels: np.ndarray):
        """Apply the length limit: (ids, labels, truncated), or the drop reason "media" / "untrained"."""
        cut = len(ids) > self.max_length
        if cut and np.isin(ids[self.max_length:], self._media_token_ids).any():
            return "media"
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if (labels[1:] == IGNORE_INDEX).all():  # position 0 is never a prediction target
            return "untrained"
        return ids, labels, cut

    def __len__(self) -> int:
        return len(self.media)

    def _sequence(self, ids: np.ndarray, labels: np.ndarray) -> dict:
        ids = torch.from_numpy(np.asarray(ids).astype(np.int64))
        return {"input_ids": ids,
                "labels": torch.from_numpy(np.asarray(labels).astype(np.int64)),
                "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": self.encoder.token_types(ids)}

    def make_item(self, seqs: list, meta: MediaMeta) -> dict:
        """The training item of one encoded sample: tensors of its sequence(s) + its decoded media."""
        if self.paired:
            item = {f"{side}_{k}": v for (ids, labels), side in zip(seqs, ("chosen", "rejected"))
                    for k, v in self._sequence(ids, labels).items()}
        else:
            item = self._sequence(*seqs[0])
        item.update(self.encoder.media(meta))
        return item

    def __getitem__(self, i: int) -> dict:
        n = 2 if self.paired else 1
        seqs = [(self.input_ids[self.offsets[k]:self.offsets[k + 1]], self.labels[self.offsets[k]:self.offsets[k + 1]])
                for k in range(n * i, n * i + n)]
        return self.make_item(seqs, self.media[i])


def build_train_dataset(data_cfg: DataConfig, processor, seq_length: int) -> SFTDataset:
    """The training set of ``data_cfg``, tokenized with ``processor``; logs what the length limit cost."""
    ds = SFTDataset(data_cfg, processor, seq_length)
    dropped = ds.num_dropped_media + ds.num_dropped_untrained
    if dropped or ds.num_truncated:
        log.warning("%s: %d samples; %d truncated to %d tokens, %d dropped (%d would have media cut at the "
                    "length limit, %d have no trained token)", data_cfg.source, len(ds), ds.num_truncated,
                    ds.max_length, dropped, ds.num_dropped_media, ds.num_dropped_untrained)
    return ds


def val_config(data_cfg: DataConfig) -> DataConfig:
    """The config of ``val_dataset``: the training config with its files and ``val_max_samples``,
    always map-style (a validation set is read whole at every evaluation)."""
    b = data_cfg.dataset_param.basic_parameters
    vcfg = data_cfg.model_copy(deep=True)
    vb = vcfg.dataset_param.basic_parameters
    vb.dataset, vb.max_samples, vb.streaming = b.val_dataset, b.val_max_samples, False
    vcfg._source = data_cfg.source
    return vcfg


def build_datasets(data_cfg: DataConfig, processor, seq_length: int, seed: int = 1234):
    """(train, validation or None). Validation is ``val_dataset`` (its own files, capped by
    ``val_max_samples``) or a ``val_rate`` fraction split off the training set with a seeded shuffle
    (at least one sample; capped by ``val_max_samples``)."""
    b = data_cfg.dataset_param.basic_parameters
    train = build_train_dataset(data_cfg, processor, seq_length)
    if b.val_dataset is not None:
        return train, build_train_dataset(val_config(data_cfg), processor, seq_length)
    if b.val_rate is not None:
        n_val = max(1, math.floor(len(train) * b.val_rate))
        if b.val_max_samples is not None:
            n_val = min(n_val, b.val_max_samples)
        if n_val >= len(train):
            raise DataError(f"{data_cfg.source}: basic_parameters.val_rate {b.val_rate} leaves no training sample "
                            f"out of {len(train)}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        return Subset(train, sorted(order[n_val:])), Subset(train, sorted(order[:n_val]))
    return train, None
