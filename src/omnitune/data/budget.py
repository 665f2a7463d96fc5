"""Resumable token-budget sampler: dynamic micro-batches grouped by length, for data-parallel training.

Budget. The budget counts PADDED tokens: a micro-batch of n samples whose longest sample has m tokens
costs n*m, and every micro-batch has n*m <= token_budget. A sample longer than the budget is an
error at construction.

Epoch plan (the list of micro-batches of epoch e, a pure function of the lengths, the settings and e):

1. Order: ``torch.randperm(N)`` with a generator seeded ``seed + e`` if shuffle, else ``arange(N)``.
2. Windows: the order is cut into consecutive windows of W = group_window * max(1, token_budget //
   ceil(mean length)) samples, i.e. about ``group_window`` micro-batches' worth (the last window
   may be shorter). Each window is sorted by length, descending (stable), and cut greedily: samples
   join the current micro-batch while (n+1) * (its first, longest sample) <= token_budget.
3. Whole steps: the micro-batch count must be a multiple of S = micro_batches_per_step * dp_size.
   While it is not, the micro-batch with the most samples (ties: the first in the list) is replaced,
   in place, by its two halves (first len//2 samples, then the rest). Nothing is dropped or repeated:
   every sample is in exactly one micro-batch of each epoch. If N < S this is impossible (ValueError
   at construction); it is also impossible when rounding up to a multiple of S needs more
   micro-batches than samples (N), which raises ValueError when that epoch is planned.
4. If shuffle, the micro-batch list is permuted by ``torch.randperm`` drawn from the same generator
   right after step 1 (so it is seeded by (seed, e)); without shuffle the list keeps window order.

Steps. Epoch e has len(plan)/S optimizer steps (this can differ between epochs when shuffling).
Step g of epoch e uses plan[g*S : (g+1)*S]; rank r gets plan[g*S + j*dp_size + r] for
j = 0 .. micro_batches_per_step-1, as one list of sample indices per yield.

Position. ``consumed_steps`` counts global optimizer steps since the start of training; it is mapped
to (epoch, step) by walking the epochs' step counts (cached). It advances to step+1 when this rank
has been handed its last micro-batch of a step; a DataLoader with workers fetches ahead, so the
training loop's own step count is the one to checkpoint and pass back on resume.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence

import torch


def padded_tokens(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[int, int]:
    """(padded, real) token counts of ``batches`` (lists of sample indices): padded sums
    len(batch) * longest sample per batch, real sums the samples' lengths."""
    padded = sum(len(b) * max(int(lengths[i]) for i in b) for b in batches if len(b))
    real = sum(int(lengths[i]) for b in batches for i in b)
    return padded, real


class TokenBudgetSampler:
    """Infinite iterable of this rank's micro-batch index lists; use as DataLoader(batch_sampler=...).
    See the module docstring for the exact plan and position semantics."""

    _CHECKED = ("num_samples", "token_budget", "micro_batches_per_step", "dp_size", "seed", "shuffle",
                "group_window", "lengths_hash")

    def __init__(self, lengths: Sequence[int], token_budget: int, micro_batches_per_step: int, dp_rank: int,
                 dp_size: int, shuffle: bool = True, seed: int = 1234, consumed_steps: int = 0,
                 group_window: int = 64):
        self._lengths = torch.as_tensor([int(x) for x in lengths], dtype=torch.int64)
        self._lengths_list = self._lengths.tolist()
        self.num_samples = len(self._lengths_list)
        if min(token_budget, micro_batches_per_step, dp_size, group_window) < 1:
            raise ValueError(f"token budget ({token_budget}), micro batches per step ({micro_batches_per_step}), "
                             f"data-parallel size ({dp_size}) and group window ({group_window}) must all be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        if self.num_samples and int(self._lengths.min()) < 1:
            bad = int(torch.nonzero(self._lengths < 1)[0])
            raise ValueError(f"sample {bad} has length {self._lengths_list[bad]}; every sample needs >= 1 token")
        longest = max(self._lengths_list, default=0)
        if longest > token_budget:
            bad = next(i for i, n in enumerate(self._lengths_list) if n > token_budget)
            raise ValueError(f"sample {bad} is {self._lengths_list[bad]} tokens long, over the token budget of "
                             f"{token_budget} (--token-budget); raise the token budget to at least the longest "
                             f"sample ({longest}) or lower --seq-length")
        self.token_budget, self.micro_batches_per_step = token_budget, micro_batches_per_step
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.seed, self.group_window = shuffle, seed, group_window
        self.step_size = micro_batches_per_step * dp_size       # S: micro-batches per optimizer step
        if self.num_samples < self.step_size:
            raise ValueError(f"the dataset has {self.num_samples} samples, too few for one optimizer step of "
                             f"{micro_batches_per_step} grad-acc x {dp_size} DP = {self.step_size} micro-batches "
                             f"(each needs at least one sample); add data or lower grad-acc / DP size")
        mean = math.ceil(sum(self._lengths_list) / self.num_samples)
        self.window_samples = group_window * max(1, token_budget // mean)
        self.lengths_hash = hashlib.sha1(self._lengths.numpy().tobytes()).hexdigest()
        self._plans: dict[int, list[list[int]]] = {}     # a few recent epoch plans
        self._epoch_steps: list[int] = []                # steps of epochs 0, 1, ...
        self._epoch_start: list[int] = [0]               # first global step of epochs 0, 1, ...
        self.consumed_steps = 0
        self.load_state_dict({"consumed_steps": consumed_steps})

    # --- plans ---------------------------------------------------------------------------------
    def _build_plan(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        n, lengths = self.num_samples, self._lengths_list
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        batches: list[list[int]] = []
        for start in range(0, n, self.window_samples):
            window = order[start:start + self.window_samples]
            by_length = torch.sort(self._lengths[window], descending=True, stable=True).indices
            batch: list[int] = []
            for i in window[by_length].tolist():
                if batch and (len(batch) + 1) * lengths[batch[0]] > self.token_budget:
                    batches.append(batch)
                    batch = []
                batch.append(i)
            batches.append(batch)
        target = -(-len(batches) // self.step_size) * self.step_size
        if target > n:
            raise ValueError(f"epoch {epoch} has {len(batches)} micro-batches; a whole number of steps needs "
                             f"{target}, more than the {n} samples (one per micro-batch at most); lower grad-acc "
                             f"x DP ({self.step_size}) or add data")
        while len(batches) < target:                     # each split adds one micro-batch
            k = max(range(len(batches)), key=lambda b: len(batches[b]))   # first of the largest
            half = len(batches[k]) // 2
            batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
        if self.shuffle:
            batches = [batches[p] for p in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = self._build_plan(epoch)
        return self._plans[epoch]

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """All micro-batches (sample index lists, over all ranks) of ``epoch``, in step order."""
        return [list(b) for b in self._plan(epoch)]

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (its micro-batch count / (micro_batches_per_step x dp_size))."""
        while len(self._epoch_steps) <= epoch:
            e = len(self._epoch_steps)
            steps = len(self._plan(e)) // self.step_size if self.shuffle or e == 0 else self._epoch_steps[0]
            self._epoch_steps.append(steps)
            self._epoch_start.append(self._epoch_start[-1] + steps)
        return self._epoch_steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of global optimizer step ``step`` (0-based)."""
        while self._epoch_start[-1] <= step:
            self.steps_in_epoch(len(self._epoch_steps))
        epoch = bisect.bisect_right(self._epoch_start, step) - 1
        return epoch, step - self._epoch_start[epoch]

    def samples_in_step(self, step: int) -> int:
        """Samples (over all ranks) of global optimizer step ``step`` (0-based from the start of training)."""
        epoch, g = self.locate(step)
        return sum(len(b) for b in self._plan(epoch)[g * self.step_size:(g + 1) * self.step_size])

    # --- iteration and state -------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        step = self.consumed_steps
        while True:
            epoch, g = self.locate(step)
            plan = self._plan(epoch)
            for j in range(self.micro_batches_per_step):
                batch = plan[g * self.step_size + j * self.dp_size + self.dp_rank]
                if j == self.micro_batches_per_step - 1:
                    self.consumed_steps = step + 1
                yield list(batch)
            step += 1

    def state_dict(self) -> dict:
        return {"consumed_steps": self.consumed_steps, **{k: getattr(self, k) for k in self._CHECKED}}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["consumed_steps"]``; the other keys, when present, must match this sampler
        (otherwise the replayed order would differ from the original run's)."""
        for key in self._CHECKED:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                                 f"the data order cannot be resumed exactly")
        consumed = int(state["consumed_steps"])
        if consumed < 0:
            raise ValueError(f"consumed_steps {consumed} must be >= 0")
        self.consumed_steps = consumed
