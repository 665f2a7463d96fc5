"""`omnitune data inspect --mm-data data.json [--index N] [--seq-length L]`: what the trainer will see.

Builds the dataset exactly as training does (same template, processor, length limit; the
preprocessing cache of ``cache_dir`` is reused or filled), then prints:

- counts: samples (per media kind, text-only), tokens (total, trained, mean / max per sequence,
  media pad tokens per kind), media (images; videos with their sampled frames and seconds; audios
  and their seconds; video sound tracks with use_audio_in_video), truncated and dropped samples;
- one sample as text: trained tokens inside ``[[...]]``, runs of media pad tokens folded to
  ``<|image_pad|>x64``; preference pairs (attr.ranking) show the chosen and the rejected sequence.

The counts come from the build step (headers, grids, lengths); then every sample's media are
decoded exactly as training decodes them (the processor's pixel values, video frames, audio
features), so a file whose header reads but whose data does not (a truncated JPEG) is refused here
naming the sample and the file, as training would refuse it. ``--no-decode`` skips that and says so.
"""
from __future__ import annotations

import json
import time
from itertools import groupby
from pathlib import Path

import numpy as np

from omnitune.data.templates import IGNORE_INDEX, KINDS

DEFAULT_SEQ_LENGTH = 1024  # the seed scripts' --seq-length


def render_sample(tokenizer, ids, labels, fold: dict[int, str] | None = None) -> str:
    """``ids`` as text; trained positions (label != -100) inside ``[[...]]``; a run of a token in
    ``fold`` (id -> its text, the media pad tokens) written once as ``<tok>xN``. Text between folds
    is decoded in one piece, so multi-token characters come out whole."""
    fold = fold or {}
    out = []
    for trained, run in groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE_INDEX):
        pieces, text_ids = [], []
        for tok_id, same in groupby(i for i, _ in run):
            n = len(list(same))
            if tok_id in fold:
                if text_ids:
                    pieces.append(tokenizer.decode(text_ids, clean_up_tokenization_spaces=False))
                    text_ids = []
                pieces.append(f"{fold[tok_id]}x{n}")
            else:
                text_ids.extend([tok_id] * n)
        if text_ids:
            pieces.append(tokenizer.decode(text_ids, clean_up_tokenization_spaces=False))
        text = "".join(pieces)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def _pad_ids(ds) -> dict[str, int]:
    """{kind: pad token id} of the template's media kinds."""
    t, tok = ds.template, ds.encoder.tokenizer
    return {k: tok.convert_tokens_to_ids(t.media(k).pad) for k in KINDS if t.media(k) is not None}


def _cache_status(ds, cfg, processor, started: float) -> str:
    from omnitune.data.cache import cache_key
    from omnitune.data.formats import resolve_dataset_files

    bp = cfg.dataset_param.basic_parameters
    if not bp.cache_dir:
        return "off (basic_parameters.cache_dir is null)"
    key, _ = cache_key(ds, cfg, processor, resolve_dataset_files(cfg))
    entry = Path(bp.cache_dir) / key
    try:
        built_at = json.loads((entry / "meta.json").read_text())["built_at"]
    except (OSError, ValueError, KeyError):
        return f"{entry} (not found after the build)"
    return f"{entry} ({'built now' if built_at >= started else 'reused'})"


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _seconds(x: float) -> str:
    return f"{x:.1f} s"


def summarize(ds) -> list[str]:
    """Count lines of a built :class:`omnitune.data.dataset.SFTDataset`."""
    enc, pads = ds.encoder, _pad_ids(ds)
    n = len(ds)
    per = 2 if ds.paired else 1
    lengths = np.diff(np.asarray(ds.offsets))
    labels, ids = np.asarray(ds.labels), np.asarray(ds.input_ids)
    trained = int((labels != IGNORE_INDEX).sum())
    # media tokens once per sample: the first (chosen) sequence of each
    first = np.repeat(np.arange(len(lengths)) % per == 0, lengths)
    media = ds.media
    with_kind = {k: sum(1 for m in media if getattr(m, k + "s")) for k in KINDS}
    text_only = sum(1 for m in media if not m.has_media)
    dropped = ds.num_dropped_media + ds.num_dropped_untrained
    parts = [f"{with_kind[k]} with {k}s" for k in KINDS if with_kind[k]] + [f"{text_only} text-only"]
    what = "preference pairs" if ds.paired else "samples"
    lines = [f"samples        : {_n(n, 'preference pair') if ds.paired else n} ({', '.join(parts)}); "
             f"{n + dropped} read, {dropped} dropped"]
    seq = "sequence, chosen and rejected counted apart" if ds.paired else "sample"
    lines.append(f"tokens         : {int(lengths.sum())} (mean {lengths.mean():.1f}, max {int(lengths.max())} per "
                 f"{seq}; limit {ds.max_length})")
    lines.append(f"trained tokens : {trained} ({100.0 * trained / max(1, int(lengths.sum())):.1f}%)")
    present = {k for k in KINDS if any(getattr(m, k + "s") for m in media)}
    if any(m.video_audio_samples for m in media):
        present.add("audio")
    counts = [f"{k} {int((ids[first] == pads[k]).sum())}" for k in KINDS if k in pads and k in present]
    if counts:
        lines.append(f"media tokens   : {', '.join(counts)} (pad tokens, once per {what[:-1]})")
    lines.append(f"images         : {sum(len(m.images) for m in media)}")
    videos = [v for m in media for v in m.videos]
    if videos:
        lines.append(f"videos         : {len(videos)} ({sum(len(v.indices) for v in videos)} frames sampled at "
                     f"video_fps {enc.video_fps}, max {enc.video_maxlen}; "
                     f"{_seconds(sum(v.duration for v in videos))})")
    n_audio = sum(len(m.audios) for m in media)
    if n_audio:
        seconds = sum(sum(m.audio_samples) for m in media) / enc.audio_rate
        lines.append(f"audios         : {n_audio} ({_seconds(seconds)} at {enc.audio_rate} Hz)")
    tracks = [s for m in media for s in m.video_audio_samples]
    if tracks:
        lines.append(f"video audio    : {_n(len(tracks), 'track')} ({_seconds(sum(tracks) / enc.audio_rate)}; "
                     f"use_audio_in_video)")
    lines.append(f"truncated      : {ds.num_truncated} (text cut at the limit {ds.max_length})")
    lines.append(f"dropped        : {ds.num_dropped_media} (media would be cut at the limit), "
                 f"{ds.num_dropped_untrained} (no trained token)")
    return lines


def describe_media(ds, index: int) -> list[str]:
    """One line per media item of sample ``index``."""
    m, enc = ds.media[index], ds.encoder
    out = []
    for i, (p, g) in enumerate(zip(m.images, m.image_grids)):
        merge = enc.image_processor.merge_size
        out.append(f"  image {i}: {p} grid {tuple(g)} -> {int(np.prod(g)) // merge ** 2} tokens")
    for i, (v, g) in enumerate(zip(m.videos, m.video_grids)):
        merge = enc.video_processor.merge_size
        track = (f", sound track {_seconds(m.video_audio_samples[i] / enc.audio_rate)}"
                 if m.video_audio_samples else "")
        out.append(f"  video {i}: {v.path} {v.width}x{v.height}, {v.total_frames} frames at {v.fps:g} fps "
                   f"({_seconds(v.duration)}), {len(v.indices)} sampled; grid {tuple(g)} -> "
                   f"{int(np.prod(g)) // merge ** 2} tokens{track}")
    for i, (p, n) in enumerate(zip(m.audios, m.audio_samples)):
        out.append(f"  audio {i}: {p} {_seconds(n / enc.audio_rate)}")
    return out


def render_index(ds, index: int) -> list[str]:
    """The sample block of ``index``: its media, then its sequence(s) rendered."""
    if not 0 <= index < len(ds):
        raise ValueError(f"--index {index}: the dataset has {len(ds)} samples (0..{len(ds) - 1})")
    fold = {tok_id: ds.template.media(k).pad for k, tok_id in _pad_ids(ds).items()}
    tok = ds.encoder.tokenizer
    lines = [f"--- sample {index} ({ds.media[index].where}); trained tokens in [[...]], media pads folded"]
    lines += describe_media(ds, index)
    per = 2 if ds.paired else 1
    names = ("chosen", "rejected") if ds.paired else ("sequence",)
    offsets = np.asarray(ds.offsets)
    for k, name in zip(range(per * index, per * index + per), names):
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        lines.append(f"--- {name} ({hi - lo} tokens)")
        lines.append(render_sample(tok, np.asarray(ds.input_ids[lo:hi]).tolist(),
                                   np.asarray(ds.labels[lo:hi]).tolist(), fold))
    return lines


def decode_media(ds) -> str:
    """Decode every sample's media as training does (``SampleEncoder.media``); a DataError names
    the sample and the file. Returns the report line."""
    t0 = time.perf_counter()
    n = 0
    for meta in ds.media:
        if meta.has_media:
            ds.encoder.media(meta)
            n += 1
    return f"decoded        : the media of {_n(n, 'sample')}, as training decodes them ({time.perf_counter() - t0:.1f} s)"


def _check_family(cfg, hf_dir: str, source: str) -> None:
    """The template must be one of the model family's, as training checks (unknown folders pass:
    training names the problem when it reads them)."""
    from transformers import AutoConfig

    from omnitune.data.templates import check_template_fits
    from omnitune.models.registry import family_for_hf_config

    try:
        family = family_for_hf_config(AutoConfig.from_pretrained(hf_dir, trust_remote_code=False))
    except (OSError, ValueError):
        return
    check_template_fits(cfg.dataset_param.basic_parameters.template, family.name, source, hf_dir)


def inspect_data(data_json: str, seq_length: int | None = None, index: int = 0, decode: bool = True) -> str:
    """The report of ``data_json``; ``seq_length`` as the training --seq-length (default:
    cutoff_len when set, else 1024); the limit is min(seq_length, cutoff_len) as in training.
    ``decode``: decode every sample's media as training will (else the report says they were not)."""
    from transformers import AutoProcessor

    from omnitune.config.data import load_data_config, unsupported_features
    from omnitune.data.dataset import SFTDataset

    cfg = load_data_config(data_json)
    pp, bp = cfg.dataset_param.preprocess_parameters, cfg.dataset_param.basic_parameters
    hf_dir = pp.model_name_or_path
    if not hf_dir:
        raise ValueError(f"{data_json}: preprocess_parameters.model_name_or_path is needed (the HF folder whose "
                         f"processor tokenizes the data)")
    if seq_length is None:
        seq_length = bp.cutoff_len or DEFAULT_SEQ_LENGTH
    _check_family(cfg, hf_dir, data_json)
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=False)
    started = time.time()
    t0 = time.perf_counter()
    ds = SFTDataset(cfg, processor, seq_length)
    took = time.perf_counter() - t0
    a = cfg.dataset_param.attr
    columns = ", ".join(f"{k}={getattr(a, k)}" for k in ("images", "videos", "audios") if getattr(a, k)) or "none"
    lines = [
        f"data.json      : {data_json} (template {bp.template}; media columns {columns}"
        + ("; use_audio_in_video" if pp.use_audio_in_video else "") + ")",
        f"build          : {took:.1f} s; cache {_cache_status(ds, cfg, processor, started)}"
        + ("; streaming: true trains from the same samples read lazily" if bp.streaming else ""),
        *(f"trainer refuses: {p}" for p in unsupported_features(cfg)),
        *summarize(ds),
        decode_media(ds) if decode else "decoded        : no (--no-decode): a media file that does not decode "
                                        "stops training when it reads that sample",
        *render_index(ds, index),
    ]
    return "\n".join(lines)
