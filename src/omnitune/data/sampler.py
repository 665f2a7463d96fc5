"""Resumable micro-batch sampler for data-parallel training (Megatron-style consumed samples).

Each epoch is a permutation of the dataset (``torch.randperm`` seeded with seed + epoch, or the
identity without shuffle). Global batch g of an epoch covers permutation positions
[g*GBS, (g+1)*GBS); inside it, micro-batch j (0 .. grad_acc-1) of rank r is positions
g*GBS + (j*dp_size + r)*MBS ... + MBS. So the ranks of one step see disjoint samples that together
are exactly the global batch.

The position in the stream is one number, ``consumed_samples`` (global samples, a multiple of GBS):
starting from it replays exactly the batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class MicroBatchSampler:
    """Infinite iterable of this rank's micro-batch index lists; use as DataLoader(batch_sampler=...).

    drop_last: an epoch is floor(N / GBS) global batches (the tail is left out; N < GBS is an
    error). Without it an epoch is ceil(N / GBS) global batches and the last one is completed with
    samples from the start of the same epoch's order, so every rank still gets full micro-batches.

    ``consumed_samples`` advances by GBS each time this rank has been handed its last micro-batch
    of a global batch. A DataLoader with workers fetches ahead of training, so the training loop's
    own count (iterations x GBS) is the one to checkpoint and pass back on resume.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                 dp_size: int, shuffle: bool = True, seed: int = 1234, drop_last: bool = True,
                 consumed_samples: int = 0):
        if min(num_samples, micro_batch_size, global_batch_size, dp_size) < 1:
            raise ValueError(f"num_samples ({num_samples}), micro batch size ({micro_batch_size}), global batch "
                             f"size ({global_batch_size}) and data-parallel size ({dp_size}) must all be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch size {global_batch_size} must be a multiple of micro batch size "
                             f"{micro_batch_size} x data-parallel size {dp_size}")
        if drop_last and num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"({global_batch_size}); lower --global-batch-size, add data, or set "
                             f"dataloader_param.drop_last false")
        self.num_samples = num_samples
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.grad_acc = global_batch_size // (micro_batch_size * dp_size)
        rounding = math.floor if drop_last else math.ceil
        self.batches_per_epoch = rounding(num_samples / global_batch_size)
        self.consumed_samples = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample indices of ``epoch`` in visiting order."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.consumed_samples // self.global_batch_size
        epoch, order = None, None
        while True:
            e, g = divmod(step, self.batches_per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            for j in range(self.grad_acc):
                start = g * self.global_batch_size + (j * self.dp_size + self.dp_rank) * self.micro_batch_size
                positions = torch.arange(start, start + self.micro_batch_size) % self.num_samples
                if j == self.grad_acc - 1:
                    self.consumed_samples = (step + 1) * self.global_batch_size
                yield order[positions].tolist()
            step += 1

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["consumed_samples"]``; the other keys, when present, must match this
        sampler (otherwise the replayed order would differ from the original run's)."""
        for key in ("num_samples", "global_batch_size", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                                 f"the data order cannot be resumed exactly")
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise ValueError(f"consumed_samples {consumed} is not a non-negative multiple of the global batch "
                             f"size {self.global_batch_size} (was the checkpoint saved with another batch size?)")
        self.consumed_samples = consumed
