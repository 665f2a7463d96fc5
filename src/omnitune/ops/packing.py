"""Packed rows (data/packing.py) in the forward: per-sample position ids, and attention that never
crosses a sample boundary.

Positions: every sample of a row gets the 3-D mRoPE position ids it would get alone. They are
computed by the family's own ``rope_index`` (the HF model's ``get_rope_index``: Qwen2-VL /
Qwen2.5-VL grids and seconds per grid, Qwen3-VL timestamps, Omni audio and audio-in-video
interleave) on the samples of the micro-batch laid out one per row, then placed back into the
packed rows. Text position ids (0, 1, ... restarting at each sample) go in front, as the
``[4, B, S]`` position ids transformers' Qwen decoders take for packed input.

Attention: the decoder is called with ``attention_mask=None`` and those text position ids, and
transformers dispatches on the text decoder's ``attn_implementation`` (model.json):
``flash_attention_2`` runs varlen attention with sample boundaries from the restarting positions
(no mask tensor); ``eager`` gets a block-diagonal causal mask built from the same restarts
(masking_utils.find_packed_sequence_indices); ``sdpa`` (the default) is replaced for packed training
by ``sdpa_packed`` (:func:`use_packed_attention`): SDPA run causally on each sample's slice, so the
cost is the sum of the samples' squared lengths instead of the row's (a row of 2048 tokens holding
3 samples spent 2.7 s of a 15.8 s forward + backward in masked dense SDPA on the bench model). Padding at the end of a row is a
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


PACKED_SDPA = "sdpa_packed"


def _segments(text_positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed sample of one row: where the text positions do not step by 1,
    exactly as transformers' find_packed_sequence_indices splits them."""
    step = torch.diff(text_positions, prepend=text_positions[:1] - 1)
    starts = (step != 1).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [len(text_positions)]))


def packed_sdpa_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers attention function ``sdpa_packed``: with packed text positions ([B, S]), causal
    SDPA on each sample's slice of the row (no S x S mask); otherwise plain ``sdpa`` with the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None or position_ids.dim() != 2 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for b in range(query.shape[0]):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                        None, is_causal=True, **kwargs)[0] for s, e in _segments(position_ids[b])]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows), None


def use_packed_attention(hf_model, family) -> str | None:
    """Packed training: the text decoder's ``sdpa`` becomes ``sdpa_packed`` (registered with
    transformers' attention and mask interfaces; unpacked batches, e.g. validation, still get plain
    sdpa with their padding mask). Returns the implementation now in use, None if unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    lm = family.language_model(hf_model)
    if lm.config._attn_implementation != "sdpa":
        return None
    lm.set_attn_implementation(PACKED_SDPA)
    return PACKED_SDPA
