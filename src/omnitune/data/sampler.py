"""Resumable micro-batch sampler for data parallel training (Megatron-style consumed samples).

Global batch g of an epoch covers positions [g*GBS, (g+1)*GBS) of that epoch's permutation (seeded
by seed + epoch). Within it, micro-batch j of rank r is positions g*GBS + (j*DP + r)*MBS ... + MBS.
The whole position is one number, ``consumed_samples``, saved in checkpoints: resuming from it
replays exactly the batches a straight run would have seen next.
"""
from __future__ import annotations

import torch


class MicroBatchSampler:
    def __init__(self, num_samples: int, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                 dp_size: int, shuffle: bool = True, seed: int = 1234,
                 consumed_samples: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch size {global_batch_size} must be a multiple of micro batch size "
                             f"{micro_batch_size} x data-parallel size {dp_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"({global_batch_size}); lower --global-batch-size or add data")
        if consumed_samples % global_batch_size:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the global batch size "
                             f"{global_batch_size} (was the checkpoint saved with another batch size?)")
        self.n, self.mbs, self.gbs = num_samples, micro_batch_size, global_batch_size
        self.rank, self.dp = dp_rank, dp_size
        self.shuffle, self.seed = shuffle, seed
        self.grad_acc = global_batch_size // (micro_batch_size * dp_size)
        self.batches_per_epoch = num_samples // global_batch_size  # the incomplete tail batch is dropped
        self.consumed_samples = consumed_samples

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        g_total = self.consumed_samples // self.gbs
        while True:
            epoch, g = divmod(g_total, self.batches_per_epoch)
            order = self._order(epoch)
            for gb in range(g, self.batches_per_epoch):
                base = gb * self.gbs
                for j in range(self.grad_acc):
                    start = base + (j * self.dp + self.rank) * self.mbs
                    yield order[start:start + self.mbs].tolist()
            g_total = (epoch + 1) * self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
