"""Fused MoE experts (model.json ``use_npu_fused_moe``, read as "fused MoE") and the router
load-balancing loss (``loss_cfg.router_aux_loss_coef``).

What transformers 5.23 does: the Qwen3-VL-MoE / Qwen3-Omni-MoE text experts are decorated with
``@use_experts_implementation``; their forward dispatches on ``config._experts_implementation``:
"eager" is the per-expert loop (the reference), "grouped_mm" (transformers' *default* when nothing
is requested) calls ``torch.nn.functional.grouped_mm`` whenever it exists -- on CPU with torch 2.14
that kernel rejects operands whose strides are not multiples of 16 bytes (odd expert sizes), so the
default can fail where eager works.

What omnitune does: the flag picks the experts implementation of each module explicitly:
- off -> "eager" (transformers' own loop, exact reference);
- on  -> "omnitune_grouped_mm", registered here: tokens sorted by expert, one grouped GEMM for
  gate_up and one for down. The grouped GEMM is ``torch._grouped_mm`` where the device has a kernel
  for the operands (CUDA sm80+ bf16, CPU; 16-byte aligned strides), else an exact per-expert
  ``torch.mm`` fallback over the same sorted layout.
Expert layouts other than concatenated gate_up [E, 2I, H] + down [E, H, I] without bias use
transformers' "grouped_mm" for the on case.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

IMPL_NAME = "omnitune_grouped_mm"


# ----------------------------------------------------------------------------------- grouped GEMM
def _aligned(t: torch.Tensor) -> bool:
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)


def grouped_mm_kernel_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can take these operands on this device."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    dev = w.device.type
    if dev == "cuda":
        if torch.cuda.get_device_capability(w.device) < (8, 0) or w.dtype != torch.bfloat16:
            return False
    elif dev != "cpu":
        return False
    # backward runs the kernel on [S, N] gradients and transposed operands too: both matrix sizes
    # must be 16-byte multiples, not only the forward strides
    es = w.element_size()
    return (w.shape[-1] * es) % 16 == 0 and (w.shape[-2] * es) % 16 == 0 and _aligned(x) and _aligned(w)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor,
               force_fallback: bool = False) -> torch.Tensor:
    """Rows ``offs[i-1]:offs[i]`` of ``x`` [S, K] times ``w[i]`` [K, N] -> [S, N] (rows sorted by
    group; ``counts`` = rows per group). Only the fallback reads the counts on the host."""
    x = x.to(w.dtype)
    if not force_fallback and grouped_mm_kernel_ok(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    outs, s = [], 0
    for i, c in enumerate(counts.tolist()):
        if c:
            outs.append(torch.mm(x[s:s + c], w[i]))
        s += c
    if not outs:
        return x.new_zeros(0, w.shape[-1])
    return torch.cat(outs)


# ----------------------------------------------------------------------------------- experts
def _layout_supported(experts: nn.Module) -> bool:
    return (getattr(experts, "has_gate", False) and getattr(experts, "is_concatenated", False)
            and not getattr(experts, "is_transposed", True) and not getattr(experts, "has_bias", True)
            and not getattr(experts, "has_post_expert_norm", True) and hasattr(experts, "gate_up_proj"))


FORCE_FALLBACK = False  # tests flip it to compare the kernel and the fallback


def grouped_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    if not _layout_supported(self):
        from transformers.integrations.moe import grouped_mm_experts_forward
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)          # expert-major, token order kept inside an expert
    token = order // k
    counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = hidden_states[token]
    gate_up = grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs, counts, FORCE_FALLBACK)   # [S, 2I]
    h = self._apply_gate(gate_up)                                                            # [S, I]
    out = grouped_mm(h, self.down_proj.transpose(1, 2), offs, counts, FORCE_FALLBACK)         # [S, H]
    out = out * top_k_weights.reshape(-1)[order, None]
    final = torch.zeros_like(hidden_states)
    return final.index_add_(0, token, out.to(final.dtype))


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPL_NAME, grouped_experts_forward)


def experts_modules(root: nn.Module) -> list[nn.Module]:
    """MoE experts modules (transformers ``@use_experts_implementation`` classes) under ``root``."""
    return [m for m in root.modules() if hasattr(m, "is_concatenated") and hasattr(m, "_apply_gate")]


def set_experts_implementation(modules: list[nn.Module], fused: bool) -> int:
    """Switch the experts of ``modules`` to the fused path (True) or transformers' eager loop.
    Returns the number of experts modules switched."""
    _register()
    impl = IMPL_NAME if fused else "eager"
    n = 0
    for m in modules:
        m.config._experts_implementation_internal = impl
        n += 1
    return n


# ----------------------------------------------------------------------------------- router aux loss
def _router_classes(model: nn.Module) -> tuple[type, ...]:
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import OutputRecorder

    classes = set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            rec = (getattr(m, "_can_record_outputs", None) or {}).get("router_logits")
            for r in (rec if isinstance(rec, (list, tuple)) else [rec]):
                if isinstance(r, OutputRecorder):
                    classes.add((r.target_class, r.index))
                elif isinstance(r, type):
                    classes.add((r, 0))
    return tuple(classes)


class RouterAuxLoss:
    """Records the router logits of every MoE layer under ``roots`` during a forward (forward hooks
    on the routers transformers itself records ``router_logits`` from) and returns transformers'
    ``load_balancing_loss_func`` of them: the same aux loss the HF model adds with
    ``output_router_logits=True``. Only records between :meth:`start` and :meth:`loss`, so a
    recompute in backward does not record twice."""

    def __init__(self, model: nn.Module, roots: list[nn.Module]):
        self.logits: list[torch.Tensor] = []
        self.active = False
        classes = _router_classes(model)
        self.routers = []
        for root in roots:
            for m in root.modules():
                for cls, index in classes:
                    if isinstance(m, cls):
                        self.routers.append(m)
                        m.register_forward_hook(self._hook(index))
                        break
        if not self.routers:
            raise ValueError("router_aux_loss_coef is set but the model has no MoE routers")
        r = self.routers[0]
        self.num_experts = r.num_experts
        self.top_k = r.top_k
        self.loss_fn = sys.modules[type(r).__module__].load_balancing_loss_func

    def _hook(self, index: int):
        def hook(module, args, output):
            if self.active:
                self.logits.append(output[index] if isinstance(output, (tuple, list)) else output)
        return hook

    def start(self) -> None:
        self.logits = []
        self.active = True

    def loss(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.active = False
        logits, self.logits = tuple(self.logits), []
        if not logits:
            raise RuntimeError("no router logits were recorded in this forward")
        return self.loss_fn(logits, self.num_experts, self.top_k, attention_mask)
