"""Sequence packing (data.json ``basic_parameters.packing: true``): several samples in one row of
up to ``--seq-length`` tokens.

What a packed row is (data/collator.py builds it, ops/packing.py runs it):

- the samples' tokens one after the other, then padding; ``segment_ids`` [B, S] numbers the
  samples of each row 0, 1, ... (-1 on padding);
- each sample keeps its own position ids (the family's 3-D mRoPE ids, computed on the sample
  alone) and attends only to itself (block-diagonal causal attention);
- the first label of every sample is ignored, so no position is trained to predict the next
  sample's first token (unpacked, that token is never a target either);
- the media of all samples of the micro-batch go through the encoders together, in sample order.

With packing, ``--micro-batch-size`` and ``--global-batch-size`` count packed rows (as in
LLaMA-Factory and Megatron: a packed sequence is one sample of the batch); the loss types keep
their meaning (``per_sample_loss`` averages over the real samples inside the rows).

Map-style data is packed once, before training, by best-fit decreasing on the sample lengths
(deterministic: the same data and capacity give the same rows, so resume is exact and every sample
is in exactly one row); the sampler then shuffles the rows each epoch. Streaming data is packed on
the fly, greedily in reading order (data/streaming.py).
"""
from __future__ import annotations

import bisect

import numpy as np
from torch.utils.data import Dataset, Subset


def sample_lengths(ds) -> np.ndarray:
    """Token length of every sample of a map-style dataset (SFTDataset, or a Subset of one)."""
    if isinstance(ds, Subset):
        return sample_lengths(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    off = np.asarray(ds.offsets, dtype=np.int64)
    if getattr(ds, "paired", False):
        raise ValueError("packing does not apply to preference pairs (attr.ranking)")
    return off[1:] - off[:-1]


def pack_indices(lengths, capacity: int) -> list[list[int]]:
    """Rows of sample indices, each with total length <= ``capacity``: best-fit decreasing (each
    sample, longest first, goes into the fullest row it fits in). Inside a row, samples keep their
    dataset order; rows are ordered by their first sample."""
    lengths = [int(x) for x in lengths]
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, more than the packing capacity {capacity} "
                         f"(--seq-length); raise --seq-length")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []   # sorted (room left, row)
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    rows = [sorted(r) for r in rows]
    rows.sort(key=lambda r: r[0])
    return rows


class PackedDataset(Dataset):
    """Map-style dataset of packed rows over ``base``: item k is ``{"packed": [sample items]}``,
    which :class:`omnitune.data.collator.Collator` turns into one row."""

    def __init__(self, base, capacity: int):
        self.base, self.capacity = base, capacity
        self.lengths = sample_lengths(base)
        self.rows = pack_indices(self.lengths, capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        return {"packed": [self.base[i] for i in self.rows[k]]}

    def fill(self) -> float:
        """Real tokens / (rows x capacity)."""
        return float(self.lengths.sum()) / max(len(self.rows) * self.capacity, 1)

    def describe(self) -> str:
        return (f"packing    : {len(self.lengths)} samples in {len(self.rows)} rows of <= {self.capacity} tokens "
                f"({self.fill():.1%} filled); micro/global batch sizes count rows")
