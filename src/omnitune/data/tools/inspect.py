"""`omnitune data inspect --mm-data data.json [--index N]`: what the trainer will see.

Counts (samples, tokens, trained tokens, images, truncated/dropped) and one sample rendered as
text with the trained spans in [[...]] and runs of image pad tokens folded to `<|image_pad|>x64`.
"""
from __future__ import annotations

from itertools import groupby

from omnitune.data.templates import IGNORE_INDEX


def render_sample(tokenizer, ids, labels) -> str:
    out = []
    for trained, run in groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE_INDEX):
        toks = [i for i, _ in run]
        pieces = []
        for tok_id, same in groupby(toks):
            n = len(list(same))
            text = tokenizer.decode([tok_id])
            pieces.append(f"{text}x{n}" if n > 3 else text * n)
        text = "".join(pieces)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def inspect_data(data_json: str, seq_length: int = 1024, index: int = 0) -> str:
    from transformers import AutoProcessor

    from omnitune.config.data import load_data_config
    from omnitune.data.dataset import SFTDataset

    cfg = load_data_config(data_json)
    hf_dir = cfg.dataset_param.preprocess_parameters.model_name_or_path
    if not hf_dir:
        raise ValueError(f"{data_json}: preprocess_parameters.model_name_or_path is needed (the processor)")
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=False)
    ds = SFTDataset(cfg, processor, seq_length)
    lengths = ds.offsets[1:] - ds.offsets[:-1]
    trained = int((ds.labels != IGNORE_INDEX).sum())
    n_images = sum(len(m[1]) for m in ds.media)
    with_images = sum(1 for m in ds.media if m[1])
    if not 0 <= index < len(ds):
        raise ValueError(f"--index {index}: the dataset has {len(ds)} samples")
    lo, hi = ds.offsets[index], ds.offsets[index + 1]
    lines = [
        f"samples        : {len(ds)} ({with_images} with images, {len(ds) - with_images} text-only)",
        f"tokens         : {int(lengths.sum())} (mean {lengths.mean():.1f}, max {int(lengths.max())} per sample; "
        f"limit {ds.max_length})",
        f"trained tokens : {trained}",
        f"images         : {n_images}",
        f"truncated      : {ds.num_truncated}",
        f"dropped        : {ds.num_dropped_media} (media would be cut at the limit), "
        f"{ds.num_dropped_untrained} (no trained token)",
        f"--- sample {index} ({ds.media[index][0]}); trained tokens in [[...]]",
        render_sample(processor.tokenizer, ds.input_ids[lo:hi].tolist(), ds.labels[lo:hi].tolist()),
    ]
    return "\n".join(lines)
