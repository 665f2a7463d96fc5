"""The PyTorch path's micro-batch sampler with torch's epoch order (randperm.py) on this back-end."""
from __future__ import annotations

from omnitune.backends.mindspore.randperm import randperm
from omnitune.data.sampler import MicroBatchSampler


class TorchOrderSampler(MicroBatchSampler):
    def epoch_order(self, epoch: int):
        import torch

        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.tensor(randperm(self.num_samples, self.seed + epoch))
