"""Chunked lm_head + cross-entropy: the [N, vocab] logits of one chunk of positions at a time.

Plain ``F.cross_entropy(lm_head(h), t)`` keeps the full [N, vocab] logits (and its softmax for
backward) alive: for a 152k vocabulary that is ~0.6 MB per trained token in fp32. Here the forward
computes the per-token losses chunk by chunk under ``no_grad`` and keeps only the inputs; the
backward recomputes each chunk's logits, turns them into the logits gradient (softmax - one-hot),
and immediately folds it into the gradients of the hidden states, weight and bias. At most one
chunk of logits (plus its softmax) is alive at any time, in forward and in backward.

The result is the vector of per-token losses, so any weighting (token mean, per-sample mean, global
token mean) is applied by the caller and flows back through ``grad_output``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if torch.is_autocast_enabled(device_type):
        return True, torch.get_autocast_dtype(device_type)
    return False, None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_size: int):
        n = hidden.shape[0]
        dev = hidden.device.type
        enabled, ac_dtype = _autocast_state(dev)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for s in range(0, n, chunk_size):
                logits = F.linear(hidden[s:s + chunk_size], weight, bias).float()
                losses[s:s + chunk_size] = F.cross_entropy(logits, target[s:s + chunk_size], reduction="none")
                del logits
        ctx.save_for_backward(hidden, weight, bias, target)
        ctx.chunk_size = chunk_size
        ctx.autocast = (dev, enabled, ac_dtype)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, target = ctx.saved_tensors
        dev, enabled, ac_dtype = ctx.autocast
        cs = ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # the dtype the forward's matmul ran in (autocast casts both operands to ac_dtype)
        cdtype = ac_dtype if enabled else torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(cdtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if (need_b and bias is not None) else None)
        grad_losses = grad_losses.float()
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs].to(cdtype)
            t = target[s:s + cs]
            logits = F.linear(h, w, None if bias is None else bias.to(cdtype)).float()
            # d loss_i / d logits_i = softmax(logits_i) - onehot(t_i), scaled by the incoming gradient
            g = torch.softmax(logits, dim=-1)
            del logits
            g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
            g *= grad_losses[s:s + cs, None]
            g = g.to(cdtype)
            if need_h:
                grad_h[s:s + cs] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w += (g.t() @ h).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
            del g
        return (grad_h,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 target: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per-token cross-entropy losses (fp32, shape [N]) of ``F.linear(hidden, weight, bias)`` against
    ``target`` (no ignored entries: pass only trained positions), computed ``chunk_size`` rows at a
    time in forward and backward."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, int(chunk_size))
