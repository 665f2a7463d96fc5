"""Workarounds for the gaps of mindnlp 0.5.1's torch layer (``mindtorch``) that training meets.

Measured on CPU with mindspore 2.7.0 (tests/test_mindspore.py holds a test for each):

1. ``Tensor.to(device)`` onto the device the tensor is already on copies it through NumPy
   (``Tensor(self.asnumpy())``): the result has no gradient history. transformers' Qwen2-VL and
   Qwen2.5-Omni forwards move the vision / audio encoder outputs with ``.to(inputs_embeds.device,
   ...)``, so the encoders silently got a zero gradient. Patched: a move onto the same device
   returns the tensor itself (what torch does).
2. ``Tensor.backward()`` does nothing: gradients come from ``torch.autograd.value_and_grad``
   (backends/mindspore/step.py), never from ``backward``.
3. ``torch.optim.AdamW.step`` fails (``addcdiv`` has no CPU kernel): backends/mindspore/optim.py
   is an AdamW written with operations that exist, with torch's exact update.
4. Tensors the collator builds after a gradient step take part in the next step's gradient in a
   way they must not: measured, the padding token's embedding row got a gradient of 8.1 instead
   of 2e-4 at the second step (loss unchanged, gradients 3 % off). Every batch is re-made from
   NumPy before its step (:func:`fresh`); the parity test compares every step's gradients.
5. ``float(tensor)`` keeps 5 decimals (0.000475 -> 0.00048): :func:`scalar` reads through NumPy.

:func:`apply` is idempotent and must run after ``import mindnlp``.
"""
from __future__ import annotations

_APPLIED = False


def _same_device_move_keeps_graph() -> None:
    import torch

    orig = torch.Tensor._move_to

    def _move_to(self, device, non_blocking=False):
        if device.type != "meta" and self.device.type == device.type and \
                (device.index is None or self.device.index in (None, device.index)):
            return self
        return orig(self, device, non_blocking)

    _move_to.__wrapped__ = orig
    torch.Tensor._move_to = _move_to


def fresh(batch: dict) -> dict:
    """The batch with every tensor re-made from its NumPy values (gap 4)."""
    import torch

    return {k: torch.tensor(v.numpy()) if torch.is_tensor(v) else v for k, v in batch.items()}


def scalar(t) -> float:
    """A 0-d tensor's value at full precision (gap 5); MindSpore tensors too."""
    import numpy as np

    v = t.asnumpy() if hasattr(t, "asnumpy") else t.numpy() if hasattr(t, "numpy") else t
    return float(np.asarray(v))


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _same_device_move_keeps_graph()
    _APPLIED = True
