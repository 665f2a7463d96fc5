"""``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` of PyTorch's CPU generator,
bit for bit, in NumPy.

The data sampler (data/sampler.py) orders each epoch with that call. mindnlp's torch layer has its
own generator, so its ``randperm`` gives another order and the two back-ends would train on other
batches. PyTorch's CPU generator is an MT19937 seeded with ``init_genrand(seed)``; ``randperm`` is a
Fisher-Yates shuffle drawing ``random() % (n - i)`` (32-bit draws; 64-bit ones from two draws once
``n`` reaches 2**24 / 20... see :func:`randperm`). tests/test_mindspore.py checks it against torch.
"""
from __future__ import annotations

import numpy as np

_SMALL = (1 << 32) // 20   # below this n, torch draws 32-bit numbers (above: 64-bit)


def _mt19937(seed: int) -> np.random.MT19937:
    key = np.empty(624, dtype=np.uint64)
    key[0] = seed & 0xFFFFFFFF
    for j in range(1, 624):
        prev = int(key[j - 1])
        key[j] = (1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF
    bg = np.random.MT19937(0)
    bg.state = {"bit_generator": "MT19937", "state": {"key": key.astype(np.uint32), "pos": 624}}
    return bg


def randperm(n: int, seed: int) -> np.ndarray:
    """The permutation torch's CPU ``randperm(n)`` gives with a generator seeded ``seed`` (int64)."""
    bg = _mt19937(seed)
    out = np.arange(n, dtype=np.int64)
    if n < 2:
        return out
    if n >= _SMALL:
        raise NotImplementedError(f"randperm of {n} >= {_SMALL} elements (64-bit draws) is not reproduced")
    draws = bg.random_raw(n - 1).astype(np.int64)
    for i in range(n - 1):
        z = int(draws[i]) % (n - i)
        out[i], out[i + z] = out[i + z], out[i]
    return out
