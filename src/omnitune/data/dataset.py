"""SFT dataset: normalized samples -> token ids, labels, media tensors.

Build time (once, cheap): read and check every conversation, count placeholder tokens from image
headers, tokenize, apply seq-length (cutoff_len) truncation. Item time: decode and patchify images.
A sample longer than the limit is cut in its text only when no media token is cut; otherwise it is
dropped and counted (a media token cut out of sync with its pixels would train on garbage).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from omnitune.config.data import DataConfig
from omnitune.data.formats import DataError, load_samples
from omnitune.data.media import image_grid, image_size, load_images
from omnitune.data.templates import encode_conversation, get_template


class SFTDataset(Dataset):
    def __init__(self, cfg: DataConfig, processor, seq_length: int):
        self.cfg = cfg
        pp = cfg.dataset_param.preprocess_parameters
        bp = cfg.dataset_param.basic_parameters
        self.image_processor = processor.image_processor
        self.min_pixels, self.max_pixels = pp.image_min_pixels, pp.image_max_pixels
        self.template = get_template(bp.template)
        tok = processor.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids(self.template.image_token)
        limit = min(seq_length, bp.cutoff_len or seq_length)
        merge2 = self.image_processor.merge_size ** 2
        self.items: list[dict] = []
        self.dropped = 0
        self.truncated = 0
        for s in load_samples(cfg):
            where = f"{s['source']}: sample {s['index']}"
            messages = self._place_image_tags(s, where)
            grids = [image_grid(*image_size(p, where), self.image_processor, self.min_pixels, self.max_pixels)
                     for p in s["images"]]
            counts = [t * h * w // merge2 for t, h, w in grids]
            ids, labels = encode_conversation(tok, self.template, messages, counts,
                                              bp.train_on_prompt, bp.mask_history)
            if len(ids) > limit:
                if self.image_token_id in ids[limit:] or \
                        tok.convert_tokens_to_ids(self.template.vision_end) in ids[limit:]:
                    self.dropped += 1
                    continue
                ids, labels = ids[:limit], labels[:limit]
                self.truncated += 1
            if all(x == -100 for x in labels[1:]):
                self.dropped += 1
                continue
            self.items.append({"input_ids": ids, "labels": labels, "images": s["images"],
                               "grids": grids, "where": where})
        if not self.items:
            raise DataError(f"{cfg.source}: no usable sample ({self.dropped} dropped: longer than seq-length "
                            f"{limit} with media at the end, or nothing to train on)")

    def _place_image_tags(self, s: dict, where: str) -> list[dict]:
        tag = self.template.image_placeholder
        messages = [dict(m) for m in s["messages"]]
        n_tags = sum(m["content"].count(tag) for m in messages)
        for m in messages:
            if m["role"] != "user" and tag in m["content"]:
                raise DataError(f"{where}: {tag} tags belong in user turns, found one in a {m['role']} turn")
        if n_tags == 0 and s["images"]:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = tag * len(s["images"]) + first_user["content"]
        elif n_tags != len(s["images"]):
            raise DataError(f"{where}: {n_tags} {tag} tag(s) but {len(s['images'])} image(s); "
                            f"each image needs exactly one tag")
        return messages

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        ids = torch.tensor(it["input_ids"], dtype=torch.long)
        out = {"input_ids": ids, "labels": torch.tensor(it["labels"], dtype=torch.long),
               "attention_mask": torch.ones_like(ids),
               "mm_token_type_ids": (ids == self.image_token_id).to(torch.int32)}
        if it["images"]:
            pv, grid = load_images(it["images"], it["where"], self.image_processor, self.min_pixels, self.max_pixels)
            if grid.tolist() != [list(g) for g in it["grids"]]:
                raise DataError(f"{it['where']}: image grid {grid.tolist()} differs from the header-based "
                                f"{it['grids']} (image changed on disk?)")
            out["pixel_values"], out["image_grid_thw"] = pv, grid
        return out


def build_train_dataset(cfg: DataConfig, processor, seq_length: int) -> SFTDataset:
    ds = SFTDataset(cfg, processor, seq_length)
    if ds.dropped or ds.truncated:
        print(f"[data] {len(ds)} samples; {ds.truncated} truncated, {ds.dropped} dropped "
              f"(media would be cut at seq-length, or no trained token)", flush=True)
    return ds
