"""Chunked lm_head + cross-entropy (ops/chunked_ce.py, loss_cfg.compute_mode chunk / dynamic_chunk):
same loss and gradients as the full logits path, and at most one chunk of logits alive."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from omnitune.ops.chunked_ce import chunked_linear_cross_entropy
from omnitune.train.loss import chunk_rows, token_losses


def _inputs(n=50, h=16, v=1009, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    lin = torch.nn.Linear(h, v, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(v, h, generator=g) * 0.3)
        if bias:
            lin.bias.copy_(torch.randn(v, generator=g) * 0.1)
    target = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    return hidden, lin, target, weights


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 50, 64])
def test_chunked_equals_full_loss_and_grads(bias, chunk):
    hidden, lin, target, weights = _inputs(bias=bias)
    h2, lin2 = hidden.detach().clone().requires_grad_(True), copy.deepcopy(lin)

    full = F.cross_entropy(lin(hidden).float(), target, reduction="none")
    (full * weights).sum().backward()
    ours = chunked_linear_cross_entropy(h2, lin2.weight, lin2.bias, target, chunk)
    (ours * weights).sum().backward()

    torch.testing.assert_close(ours, full.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, hidden.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin2.weight.grad, lin.weight.grad, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(lin2.bias.grad, lin.bias.grad, rtol=1e-6, atol=1e-6)


def test_dynamic_chunk_rows_balanced_and_bounded():
    assert chunk_rows(100, "default", 8) is None
    assert chunk_rows(100, "chunk", 8) == 8
    for n in (1, 7, 8, 9, 100, 1000):
        rows = chunk_rows(n, "dynamic_chunk", 8)
        chunks = -(-n // rows)
        assert rows <= 8 and chunks == -(-n // 8) and rows * chunks - n < chunks, (n, rows)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_rows(10, "chunk", None)


class VocabTensors(TorchDispatchMode):
    """Tracks every tensor with last dimension == vocab produced by any op (forward and backward)
    while it is alive; ``peak`` is the largest total bytes of them alive at once. Storages listed
    in ``exclude`` (the weight, whose transpose is [H, vocab]) are not counted."""

    def __init__(self, vocab: int, exclude: set[int]):
        super().__init__()
        self.vocab, self.exclude = vocab, exclude
        self.live: dict[int, int] = {}
        self.peak = 0
        self.largest_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                key = t.untyped_storage().data_ptr()
                if key in self.exclude or key in self.live:
                    continue
                self.live[key] = t.untyped_storage().nbytes()
                weakref.finalize(t, self.live.pop, key, None)
                self.largest_rows = max(self.largest_rows, t.numel() // self.vocab)
                self.peak = max(self.peak, sum(self.live.values()))
        return out


def _peak(mode: str, n=256, chunk=16, v=4099):
    hidden, lin, target, weights = _inputs(n=n, v=v, bias=False)
    labels = torch.full((1, n + 1), -100)
    labels[0, 1:] = target
    h = torch.cat([hidden, torch.zeros(1, hidden.shape[1])])[None]   # last position has no target
    tracker = VocabTensors(v, {lin.weight.untyped_storage().data_ptr()})
    with tracker:
        loss, count = token_losses(h, lin, labels, compute_mode=mode, chunk_size=chunk)
        loss.backward()
    assert count.item() == n
    return tracker, loss.item(), lin.weight.grad.clone()


def test_peak_logits_memory_bounded_by_chunk():
    n, chunk, v = 256, 16, 4099
    full, loss_full, g_full = _peak("default", n, chunk, v)
    chunked, loss_chunk, g_chunk = _peak("chunk", n, chunk, v)
    assert abs(loss_full - loss_chunk) <= 1e-6 * abs(loss_full)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-5)  # sum over 256 tokens: larger grads
    # full path: the [n, vocab] logits (and more) alive at once
    assert full.largest_rows >= n and full.peak >= n * v * 4, (full.largest_rows, full.peak)
    # chunked: no [*, vocab] tensor larger than a chunk, and never more than a few chunks' worth alive
    assert chunked.largest_rows <= chunk, chunked.largest_rows
    assert chunked.peak <= 3 * chunk * v * 4, chunked.peak
    assert chunked.peak * 5 < full.peak


def test_train_model_chunk_modes_equal_default(tmp_path):
    """Through TrainModel on a tiny Qwen2-VL: chunk and dynamic_chunk give the default loss and grads."""
    from omnitune.config.model import ModelJson
    from omnitune.models.registry import get_family
    from omnitune.train.model import TrainModel

    fam = get_family("qwen2_vl")
    torch.manual_seed(0)
    hf = fam.model_class()(fam.tiny_config()).float()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 5000, (2, 20), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, :11] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = {}
    for mode in ("default", "chunk", "dynamic_chunk"):
        tm = TrainModel(copy.deepcopy(hf), fam, ModelJson(model_id="qwen2vl",
                                                          loss_cfg={"compute_mode": mode, "chunk_size": 4}))
        loss, n, aux = tm(batch)
        (loss / n + aux).backward()
        results[mode] = (loss.item(), {k: p.grad.clone() for k, p in tm.hf.named_parameters() if p.grad is not None})
    ref_loss, ref_grads = results["default"]
    for mode in ("chunk", "dynamic_chunk"):
        loss, grads = results[mode]
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (mode, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{mode} {k}: {m}")
