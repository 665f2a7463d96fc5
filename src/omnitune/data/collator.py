"""Pad dataset items into a batch. Runs every step: no I/O, no config parsing."""
from __future__ import annotations

import torch

from omnitune.data.templates import IGNORE_INDEX


class Collator:
    """Right-pad to the longest item: input_ids with ``pad_token_id``, labels with -100,
    attention_mask and mm_token_type_ids with 0. Images of all items are concatenated in item order
    (pixel_values, image_grid_thw); both keys are absent when no item has an image.
    ``num_tokens`` is the number of real (unpadded) tokens, for throughput logging."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(it["input_ids"]) for it in items)

        def pad(key: str, value: int, dtype: torch.dtype) -> torch.Tensor:
            out = torch.full((len(items), length), value, dtype=dtype)
            for row, it in enumerate(items):
                out[row, :len(it[key])] = it[key]
            return out

        batch = {"input_ids": pad("input_ids", self.pad_token_id, torch.long),
                 "labels": pad("labels", IGNORE_INDEX, torch.long),
                 "attention_mask": pad("attention_mask", 0, torch.long),
                 "mm_token_type_ids": pad("mm_token_type_ids", 0, torch.int32)}
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        with_images = [it for it in items if "pixel_values" in it]
        if with_images:
            batch["pixel_values"] = torch.cat([it["pixel_values"] for it in with_images])
            batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in with_images])
        return batch
