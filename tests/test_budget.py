"""TokenBudgetSampler: coverage per epoch, padded-token budget, step structure, length grouping,
exact resume, state checks and errors. Pure index arithmetic: no model, no data files."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from omnitune.data.budget import TokenBudgetSampler, padded_tokens

BUDGET = 1024


def _lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short/medium samples plus a few long ones (up to the whole budget)."""
    rng = random.Random(seed)
    out = [rng.randint(8, 300) for _ in range(n)]
    for i in rng.sample(range(n), 6):
        out[i] = rng.randint(700, BUDGET)
    out[rng.randrange(n)] = BUDGET
    return out


def _samplers(lengths, ga, dp, **kw):
    return [TokenBudgetSampler(lengths=lengths, token_budget=BUDGET, micro_batches_per_step=ga, dp_rank=r,
                               dp_size=dp, **kw) for r in range(dp)]


def _steps(sampler, n_steps):
    """n_steps optimizer steps of this rank, each a list of its micro-batches; checks that
    consumed_steps advances exactly on the last micro-batch of each step."""
    it, out = iter(sampler), []
    start = sampler.consumed_steps
    for s in range(n_steps):
        step = []
        for j in range(sampler.micro_batches_per_step):
            step.append(next(it))
            done = s + 1 if j == sampler.micro_batches_per_step - 1 else s
            assert sampler.consumed_steps == start + done
        out.append(step)
    return out


@pytest.mark.parametrize("ga,dp,shuffle", [(1, 1, True), (4, 1, True), (1, 4, True), (3, 2, True),
                                           (2, 3, False), (1, 1, False)])
def test_every_sample_once_per_epoch_within_budget_and_step_structure(ga, dp, shuffle):
    lengths = _lengths(301, seed=ga * 10 + dp)
    samplers = _samplers(lengths, ga, dp, shuffle=shuffle, seed=7, group_window=8)
    ref, epochs = samplers[0], 3
    per_epoch = [ref.steps_in_epoch(e) for e in range(epochs)]
    runs = [_steps(s, sum(per_epoch)) for s in samplers]
    step = 0
    for e, n_steps in enumerate(per_epoch):
        plan, seen = ref.epoch_plan(e), []
        assert len(plan) == n_steps * ga * dp
        for g in range(n_steps):
            mbs = [runs[r][step] for r in range(dp)]
            assert all(len(m) == ga for m in mbs)                 # grad-acc micro-batches per rank
            for r, j in itertools.product(range(dp), range(ga)):
                assert mbs[r][j] == plan[g * ga * dp + j * dp + r]
            step_samples = [i for m in mbs for b in m for i in b]
            assert ref.samples_in_step(step) == len(step_samples)
            seen += step_samples
            step += 1
        assert sorted(seen) == list(range(len(lengths)))           # each sample exactly once, none dropped
        for b in plan:
            assert b and len(b) * max(lengths[i] for i in b) <= BUDGET
    if not shuffle:
        assert ref.epoch_plan(0) == ref.epoch_plan(1)
    else:
        assert ref.epoch_plan(0) != ref.epoch_plan(1)


def test_grouping_by_length_reduces_padding():
    lengths = _lengths(2000, seed=3)
    s = TokenBudgetSampler(lengths=lengths, token_budget=BUDGET, micro_batches_per_step=2, dp_rank=0, dp_size=2,
                           seed=11)
    plan = s.epoch_plan(0)
    padded, real = padded_tokens(plan, lengths)
    assert real == sum(lengths)
    mean_bs = round(len(lengths) / len(plan))
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(11)).tolist()
    fixed = [order[i:i + mean_bs] for i in range(0, len(order), mean_bs)]
    f_padded, f_real = padded_tokens(fixed, lengths)
    assert f_real == real
    assert padded / real < f_padded / f_real
    assert padded / real < 1.15 < f_padded / f_real       # grouping pads little; a random split pads a lot


def test_padded_tokens_counts():
    assert padded_tokens([[0, 1], [2]], [3, 5, 7]) == (2 * 5 + 7, 15)


def test_split_rule_makes_whole_steps_without_dropping():
    # 10 samples of 10 tokens, budget 40 -> greedy [0..3] [4..7] [8, 9]: 3 micro-batches; S = 2 needs 4,
    # so the first largest micro-batch is halved in place.
    s = TokenBudgetSampler(lengths=[10] * 10, token_budget=40, micro_batches_per_step=1, dp_rank=0, dp_size=2,
                           shuffle=False)
    assert s.epoch_plan(0) == [[0, 1], [2, 3], [4, 5, 6, 7], [8, 9]]
    assert [s.samples_in_step(g) for g in range(4)] == [4, 6, 4, 6]
    # unshuffled windows are sorted by length, descending, then cut greedily under the budget
    s = TokenBudgetSampler(lengths=[5, 30, 10, 20], token_budget=40, micro_batches_per_step=1, dp_rank=0,
                           dp_size=1, shuffle=False)
    assert s.epoch_plan(0) == [[1], [3, 2], [0]]


@pytest.mark.parametrize("k", [0, 5, 6, 17, 40, 61, 64, 100])
def test_resume_replays_the_uninterrupted_stream(k):
    lengths, ga, dp = _lengths(200, seed=5), 3, 2
    kw = dict(lengths=lengths, token_budget=BUDGET, micro_batches_per_step=ga, dp_rank=1, dp_size=dp, seed=9,
              group_window=2)
    probe = TokenBudgetSampler(**kw)
    steps = [probe.steps_in_epoch(e) for e in range(4)]
    assert len(set(steps)) > 1            # epochs differ in length: the (epoch, step) walk is exercised
    total = sum(steps) * ga               # micro-batches of 4 epochs
    assert k < total
    straight = list(itertools.islice(iter(TokenBudgetSampler(**kw)), total))
    first = TokenBudgetSampler(**kw)
    assert list(itertools.islice(iter(first), k)) == straight[:k]
    state = first.state_dict()
    assert state["consumed_steps"] == k // ga
    resumed = TokenBudgetSampler(**kw, consumed_steps=state["consumed_steps"])
    resumed_b = TokenBudgetSampler(**kw)
    resumed_b.load_state_dict(state)
    start = state["consumed_steps"] * ga  # an unfinished step is replayed from its first micro-batch
    assert list(itertools.islice(iter(resumed), total - start)) == straight[start:]
    assert list(itertools.islice(iter(resumed_b), total - start)) == straight[start:]


def test_works_as_dataloader_batch_sampler():
    lengths = _lengths(64, seed=1)
    s = TokenBudgetSampler(lengths=lengths, token_budget=BUDGET, micro_batches_per_step=2, dp_rank=0, dp_size=1)
    loader = torch.utils.data.DataLoader(list(range(64)), batch_sampler=s, collate_fn=list)
    got = list(itertools.islice(iter(loader), 4))
    assert got == s.epoch_plan(0)[:4]


@pytest.mark.parametrize("key,change", [
    ("token_budget", dict(token_budget=2048)), ("micro_batches_per_step", dict(micro_batches_per_step=2)),
    ("dp_size", dict(dp_size=4)), ("seed", dict(seed=1)), ("shuffle", dict(shuffle=False)),
    ("group_window", dict(group_window=8)), ("num_samples", dict(lengths=_lengths(100)[:99])),
    ("lengths_hash", dict(lengths=_lengths(100)[::-1]))])
def test_load_state_dict_mismatch_names_the_key(key, change):
    kw = dict(lengths=_lengths(100), token_budget=BUDGET, micro_batches_per_step=1, dp_rank=0, dp_size=2)
    state = TokenBudgetSampler(**kw, consumed_steps=3).state_dict()
    other = TokenBudgetSampler(**{**kw, **change})
    with pytest.raises(ValueError, match=rf"{key}=.*cannot be resumed exactly") as err:
        other.load_state_dict(state)
    assert repr(state[key]) in str(err.value) and repr(getattr(other, key)) in str(err.value)
    TokenBudgetSampler(**kw).load_state_dict(state)        # the same settings resume fine


def test_too_long_sample_error():
    with pytest.raises(ValueError, match=r"sample 2 is 1500 tokens long, over the token budget of 1024") as err:
        TokenBudgetSampler(lengths=[10, 20, 1500, 1800], token_budget=1024, micro_batches_per_step=1, dp_rank=0,
                           dp_size=1)
    assert "raise the token budget to at least the longest sample (1800) or lower --seq-length" in str(err.value)


def test_too_few_samples_errors():
    with pytest.raises(ValueError, match=r"5 samples, too few .* 3 grad-acc x 2 DP = 6 micro-batches"):
        TokenBudgetSampler(lengths=[10] * 5, token_budget=100, micro_batches_per_step=3, dp_rank=0, dp_size=2)
    # enough samples for S, but every micro-batch is one sample and 5 is no multiple of S = 4
    s = TokenBudgetSampler(lengths=[100] * 5, token_budget=100, micro_batches_per_step=2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match=r"epoch 0 has 5 micro-batches; a whole number of steps needs 8"):
        next(iter(s))
    with pytest.raises(ValueError, match=r"rank 2 is outside"):
        TokenBudgetSampler(lengths=[10] * 8, token_budget=100, micro_batches_per_step=1, dp_rank=2, dp_size=2)
