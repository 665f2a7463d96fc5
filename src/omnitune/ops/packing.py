"""Packed rows (data/packing.py) in the forward: per-sample position ids, and attention that never
crosses a sample boundary.

Positions: every sample of a row gets the 3-D mRoPE position ids it would get alone. They are
computed by the family's own ``rope_index`` (the HF model's ``get_rope_index``: Qwen2-VL /
Qwen2.5-VL grids and seconds per grid, Qwen3-VL timestamps, Omni audio and audio-in-video
interleave) on the samples of the micro-batch laid out one per row, then placed back into the
packed rows. Text position ids (0, 1, ... restarting at each sample) go in front, as the
``[4, B, S]`` position ids transformers' Qwen decoders take for packed input.

Attention: the decoder is called with ``attention_mask=None`` and those text position ids, and
transformers dispatches on the module's ``attn_implementation`` (model.json): ``sdpa`` / ``eager``
get a block-diagonal causal mask built from where the text positions restart
(masking_utils.find_packed_sequence_indices); ``flash_attention_2`` runs varlen attention with
sequence boundaries from the same positions (no mask tensor). Padding at the end of a row is a
segment of its own and never trained. The vision and audio towers are unaffected: they already
attend per image / audio (cu_seqlens).
"""
from __future__ import annotations

import torch

#: batch keys of per-media values the family's rope_index may read (in sample order, as collated)
MEDIA_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "video_second_per_grid",
              "feature_attention_mask", "use_audio_in_video")


def segment_spans(segment_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, length) of every packed sample, in row then position order."""
    spans = []
    for r, row in enumerate(segment_ids):
        start = 0
        for n in torch.bincount(row[row >= 0]).tolist():
            spans.append((r, start, n))
            start += n
    return spans


def packed_position_ids(family, model, batch: dict, pad_token_id: int = 0) -> torch.Tensor:
    """``[4, B, S]`` position ids of a packed batch: text positions, then the 3-D mRoPE positions of
    each sample computed as if it were alone."""
    seg, ids = batch["segment_ids"], batch["input_ids"]
    types = batch.get("mm_token_type_ids")
    if types is None:
        types = torch.zeros_like(ids)
    spans = segment_spans(seg.cpu())
    B, S = ids.shape
    out = torch.zeros(4, B, S, dtype=torch.long, device=ids.device)
    out[:] = torch.arange(S, device=ids.device)   # padding tails: re-filled below from their start
    if not spans:
        return out
    width = max(n for _, _, n in spans)
    sub_ids = torch.full((len(spans), width), pad_token_id, dtype=ids.dtype, device=ids.device)
    sub_mask = torch.zeros(len(spans), width, dtype=torch.long, device=ids.device)
    sub_types = torch.zeros(len(spans), width, dtype=types.dtype, device=ids.device)
    for k, (r, st, n) in enumerate(spans):
        sub_ids[k, :n], sub_types[k, :n], sub_mask[k, :n] = ids[r, st:st + n], types[r, st:st + n], 1
    sub = {"input_ids": sub_ids, "attention_mask": sub_mask, "mm_token_type_ids": sub_types}
    for key in MEDIA_KEYS:
        if batch.get(key) is not None:
            sub[key] = batch[key]
    if batch.get("pixel_values") is None:
        sub.pop("image_grid_thw", None)
    if batch.get("pixel_values_videos") is None:
        sub.pop("video_grid_thw", None)
    pos3 = family.rope_index(model, sub).to(out.device)   # [3, n, width]
    ends = [0] * B
    for k, (r, st, n) in enumerate(spans):
        out[0, r, st:st + n] = torch.arange(n, device=out.device)
        out[1:, r, st:st + n] = pos3[:, k, :n]
        ends[r] = st + n
    for r, e in enumerate(ends):   # padding tail: positions 0, 1, ... (a segment of its own)
        out[:, r, e:] = torch.arange(S - e, device=out.device)
    return out
