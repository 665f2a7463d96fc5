"""Pad a list of samples into a batch. No I/O, no config parsing: runs every step."""
from __future__ import annotations

import torch

from omnitune.data.templates import IGNORE_INDEX


class Collator:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        n = max(len(it["input_ids"]) for it in items)

        def pad(key, value, dtype):
            out = torch.full((len(items), n), value, dtype=dtype)
            for r, it in enumerate(items):
                out[r, : len(it[key])] = it[key]
            return out

        batch = {"input_ids": pad("input_ids", self.pad, torch.long),
                 "labels": pad("labels", IGNORE_INDEX, torch.long),
                 "attention_mask": pad("attention_mask", 0, torch.long),
                 "mm_token_type_ids": pad("mm_token_type_ids", 0, torch.int32)}
        with_images = [it for it in items if "pixel_values" in it]
        if with_images:
            batch["pixel_values"] = torch.cat([it["pixel_values"] for it in with_images])
            batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in with_images])
        return batch
