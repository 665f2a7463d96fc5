"""Pad dataset items into a batch. Runs every step: no I/O, no config parsing."""
from __future__ import annotations

import torch

from omnitune.data.templates import IGNORE_INDEX

SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids")
# Media keys concatenated along dim 0 in item order (absent when no item has them).
CONCAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
               "video_second_per_grid")


class Collator:
    """Right-pad to the longest item: input_ids with ``pad_token_id``, labels with -100,
    attention_mask and mm_token_type_ids with 0. Media of all items are concatenated in item order
    under the HF processor's names (pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw, second_per_grid_ts / video_second_per_grid); audio features
    (input_features [n_audio, mels, frames]) are zero-padded to the longest along frames, with
    feature_attention_mask marking the real frames. A key is absent when no item has it, so any mix
    of image / video / audio / text-only items works. ``num_tokens`` is the number of real
    (unpadded) tokens, for throughput logging.

    Preference items (chosen_* / rejected_* sequences) become 2B rows: the B chosen sequences, then
    the B rejected ones (row k and row B+k share the prompt and the media). The media are repeated
    for the rejected rows, or, with ``share_pair_media``, kept once (the B items' media) with
    ``pair_media_shared=True`` in the batch: the family's forward then encodes each pair's images
    and videos once and uses the features for both rows (models/base.py ``forward_hidden``).

    Packed items (``{"packed": [items]}``, data/packing.py) become one row each: the samples'
    sequences one after the other, the first label of each sample set to -100, and
    ``segment_ids`` [B, S] (sample number inside the row, -1 on padding); media in sample order.

    ``use_audio_in_video`` (data.json preprocess_parameters): the batch then carries
    ``use_audio_in_video=True`` when it has videos, which the Omni models need to place the
    interleaved audio and video positions.
    """

    def __init__(self, pad_token_id: int, use_audio_in_video: bool = False, share_pair_media: bool = False):
        self.pad_token_id = pad_token_id
        self.use_audio_in_video = use_audio_in_video
        self.share_pair_media = share_pair_media

    def __call__(self, items: list[dict]) -> dict:
        shared = False
        packed = bool(items) and "packed" in items[0]
        if packed:   # data/packing.py: each item is the samples of one row
            rows = [pack_row(it["packed"]) for it in items]
            media = [s for it in items for s in it["packed"]]
        elif items and "chosen_input_ids" in items[0]:
            rows = [{k: it[f"{side}_{k}"] for k in SEQUENCE_KEYS} for side in ("chosen", "rejected") for it in items]
            shared = self.share_pair_media
            media = items if shared else [it for _ in range(2) for it in items]
        else:
            rows = media = items
        length = max(len(r["input_ids"]) for r in rows)
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0,
                      "mm_token_type_ids": 0}
        batch = {}
        for key in SEQUENCE_KEYS:
            out = torch.full((len(rows), length), pad_values[key], dtype=rows[0][key].dtype)
            for i, r in enumerate(rows):
                out[i, :len(r[key])] = r[key]
            batch[key] = out
        if packed:
            seg = torch.full((len(rows), length), -1, dtype=torch.long)
            for i, r in enumerate(rows):
                seg[i, :len(r["segment_ids"])] = r["segment_ids"]
            batch["segment_ids"] = seg
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        for key in CONCAT_KEYS:
            parts = [it[key] for it in media if key in it]
            if parts:
                batch[key] = torch.cat(parts)
        feats = [it for it in media if "input_features" in it]
        if feats:
            frames = max(it["input_features"].shape[-1] for it in feats)
            n = sum(len(it["input_features"]) for it in feats)
            x = feats[0]["input_features"].new_zeros(n, feats[0]["input_features"].shape[1], frames)
            mask = torch.zeros(n, frames, dtype=torch.long)
            k = 0
            for it in feats:
                f, m = it["input_features"], it["feature_attention_mask"]
                x[k:k + len(f), :, :f.shape[-1]] = f
                mask[k:k + len(f), :m.shape[-1]] = m
                k += len(f)
            batch["input_features"], batch["feature_attention_mask"] = x, mask
        if self.use_audio_in_video and "pixel_values_videos" in batch:
            batch["use_audio_in_video"] = True
        if shared:
            batch["pair_media_shared"] = True
        return batch


def pack_row(samples: list[dict]) -> dict:
    """One packed row: the samples' sequences concatenated, each sample's first label ignored (its
    first token is never a target, as unpacked), and ``segment_ids`` numbering the samples."""
    row = {k: torch.cat([s[k] for s in samples]) for k in SEQUENCE_KEYS}
    row["labels"] = row["labels"].clone()
    starts = torch.tensor([0] + [len(s["input_ids"]) for s in samples]).cumsum(0)
    row["labels"][starts[:-1]] = IGNORE_INDEX
    row["segment_ids"] = torch.repeat_interleave(torch.arange(len(samples)), starts.diff())
    return row
