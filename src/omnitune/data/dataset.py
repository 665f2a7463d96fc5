"""SFT dataset: normalized samples -> token ids, labels and image tensors.

Build time (once): read and check every conversation, size every image from its header (to know
its placeholder token count), render with the template and tokenize in batches, apply the length
limit. Ids and labels of all samples live in two flat int32 arrays, so a large dataset costs little
memory and DataLoader workers share it without copy-on-write growth. Item time: decode and patchify
the sample's images.

Length limit = min(seq_length, cutoff_len). A longer sample is cut in its text only when no media
token would be cut; otherwise it is dropped and counted (a media token cut out of sync with its
pixels cannot train). Samples left with no trained token are dropped too. Both are reported once.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from omnitune.config.data import DataConfig
from omnitune.data.formats import DataError
from omnitune.data.media import image_grid, load_images
from omnitune.data.templates import IGNORE_INDEX, encode, get_template, place_image_tags, render

log = logging.getLogger(__name__)


class SFTDataset(Dataset):
    """Map-style dataset of tokenized conversations.

    Item keys: input_ids, labels (long [L]), attention_mask (long [L], ones), mm_token_type_ids
    (int32 [L], 1 on image pad tokens), and for samples with images pixel_values (float
    [n_patches, C*T*P*P]) + image_grid_thw (long [k, 3]).
    Attributes: ``media[i]`` = (where, image paths, patch grids) of sample i, ``max_length``, and
    the build counts ``num_truncated``, ``num_dropped_media``, ``num_dropped_untrained``.
    """

    def __init__(self, cfg: DataConfig, processor, seq_length: int, *, build: bool = True):
        self.cfg = cfg
        pp, bp = cfg.dataset_param.preprocess_parameters, cfg.dataset_param.basic_parameters
        self.template = get_template(bp.template)
        self.image_processor = processor.image_processor
        self.min_pixels, self.max_pixels = max(pp.image_min_pixels, 1), pp.image_max_pixels  # see media.py
        tok = self.tokenizer = processor.tokenizer
        img = self.template.image
        self.image_token_id = tok.convert_tokens_to_ids(img.pad)
        self._media_token_ids = np.array([tok.convert_tokens_to_ids(t) for t in (img.start, img.pad, img.end)])
        self.max_length = min(seq_length, bp.cutoff_len or seq_length)
        self.num_truncated = self.num_dropped_media = self.num_dropped_untrained = 0
        if not build:  # an encoder only (streaming: omnitune.data.streaming)
            return

        # Build (or reuse the cache_dir entry): see omnitune.data.cache.
        from omnitune.data.cache import build_or_load
        state = build_or_load(self, cfg, processor)
        self.input_ids, self.labels, self.offsets = state.input_ids, state.labels, state.offsets
        self.media = state.media
        self.num_truncated, self.num_dropped_media, self.num_dropped_untrained = state.counts
        if not self.media:
            raise DataError(f"{cfg.source}: no usable sample out of {state.num_samples}: "
                            f"{self.num_dropped_media} would have media cut at the length limit "
                            f"{self.max_length}, {self.num_dropped_untrained} have no trained token")

    def encode_samples(self, samples: list[dict]) -> list:
        """Encode normalized samples (one tokenizer call). Per sample: (ids int32, labels int32,
        truncated, media meta) or the drop reason "media" / "untrained". Pure: no state changes,
        so it can run in worker processes (omnitune.data.cache)."""
        cfg, tok, bp = self.cfg, self.tokenizer, self.cfg.dataset_param.basic_parameters
        img = self.template.image
        merge2 = self.image_processor.merge_size ** 2
        rendered, metas = [], []
        for s in samples:
            where = f"{s['source']}: sample {s['index']}"
            if not s["images"] and cfg.dataset_param.attr.images is None and \
                    any(img.placeholder in m["content"] for m in s["messages"]):
                raise DataError(f"{where}: has {img.placeholder} tags but data.json attr.images is not set")
            messages = place_image_tags(self.template, s["messages"], len(s["images"]), where)
            grids = tuple(image_grid(p, where, self.image_processor, self.min_pixels, self.max_pixels)
                          for p in s["images"])
            counts = [t * h * w // merge2 for t, h, w in grids]
            rendered.append(render(self.template, messages, counts, bp.train_on_prompt, bp.mask_history))
            metas.append((where, tuple(s["images"]), grids))
        out = []
        for (ids, labels), meta in zip(encode(tok, rendered), metas):
            res = self._fit(ids.astype(np.int32), labels.astype(np.int32))
            out.append(res if isinstance(res, str) else (*res, meta))
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

    def __getitem__(self, i: int) -> dict:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.make_item(self.input_ids[lo:hi], self.labels[lo:hi], self.media[i])

    def make_item(self, input_ids: np.ndarray, labels: np.ndarray, meta) -> dict:
        """The training item of one encoded sample: tensors of its ids/labels + its decoded media."""
        ids = torch.from_numpy(input_ids.astype(np.int64))
        item = {"input_ids": ids,
                "labels": torch.from_numpy(labels.astype(np.int64)),
                "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == self.image_token_id).to(torch.int32)}
        where, paths, grids = meta
        if paths:
            pixel_values, grid_thw = load_images(list(paths), where, self.image_processor,
                                                 self.min_pixels, self.max_pixels)
            if grid_thw.tolist() != [list(g) for g in grids]:
                raise DataError(f"{where}: image grid {grid_thw.tolist()} differs from the one computed at "
                                f"build time {list(grids)} (image changed on disk?)")
            item["pixel_values"], item["image_grid_thw"] = pixel_values, grid_thw
        return item


def build_train_dataset(data_cfg: DataConfig, processor, seq_length: int) -> SFTDataset:
    """The training set of ``data_cfg``, tokenized with ``processor``; logs what the length limit cost."""
    ds = SFTDataset(data_cfg, processor, seq_length)
    dropped = ds.num_dropped_media + ds.num_dropped_untrained
    if dropped or ds.num_truncated:
        log.warning("%s: %d samples; %d truncated to %d tokens, %d dropped (%d would have media cut at the "
                    "length limit, %d have no trained token)", data_cfg.source, len(ds), ds.num_truncated,
                    ds.max_length, dropped, ds.num_dropped_media, ds.num_dropped_untrained)
    return ds


def build_datasets(data_cfg: DataConfig, processor, seq_length: int, seed: int = 1234):
    """(train, validation or None). Validation is ``val_dataset`` (its own files, capped by
    ``val_max_samples``) or a ``val_rate`` fraction split off the training set with a seeded shuffle
    (at least one sample; capped by ``val_max_samples``)."""
    b = data_cfg.dataset_param.basic_parameters
    train = build_train_dataset(data_cfg, processor, seq_length)
    if b.val_dataset is not None:
        vcfg = data_cfg.model_copy(deep=True)
        vb = vcfg.dataset_param.basic_parameters
        vb.dataset, vb.max_samples = b.val_dataset, b.val_max_samples
        vcfg._source = data_cfg.source
        return train, build_train_dataset(vcfg, processor, seq_length)
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
