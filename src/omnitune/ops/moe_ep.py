"""Expert-parallel MoE experts: token dispatch and combine with all-to-all (parallel/ep.py sets it up).

Each rank of an "ep" group holds ``E / ep`` consecutive experts of every MoE layer (rank j: experts
``j*El .. (j+1)*El - 1``) and its OWN tokens (ep is carved out of data parallel). The router stays
replicated and runs on local tokens, so its logits (and the router aux loss) are what they are
without EP. Per experts call, on every rank of the group:

1. sort the (token, k) pairs by global expert (stable: token order kept inside an expert); since
   the experts of a rank are consecutive, this is also sorted by destination rank;
2. exchange the per-expert counts (``all_to_all_single``, no autograd), then the token rows
   (``all_to_all_single_autograd``: its backward is the reverse all-to-all);
3. reorder the received rows (source-rank-major) to local-expert-major and compute the local
   experts: the grouped GEMM of ops/moe.py when the module was on the fused path, else a per-expert
   loop written like transformers' eager experts forward;
4. send the results back (all-to-all), multiply by the routing weights and sum per token on the
   source rank (same order as the non-EP fused path).

Every rank takes part in both all-to-alls of every call (possibly with no rows), and the local
output always depends on the received rows and on both expert weights, so the backward runs the
same collectives on every rank and every rank has gradients for its expert shards (FSDP2 needs
the same set of gradients on all ranks of its group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from omnitune.ops import moe

EP_IMPL_NAME = "omnitune_ep"


@dataclass
class EPContext:
    """What one EP-sharded experts module needs at forward time (``module._omnitune_ep``)."""
    group: object          # the "ep" process group
    ep: int                # ranks in the group
    num_local: int         # experts held by this rank
    fused: bool            # local experts by grouped GEMM (True) or a per-expert loop (False)
    rank: int = 0          # this rank's index in the group
    sent_rows: int = 0     # (token, expert) rows sent to other ranks so far (a counter for tests/logs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _connected_empty(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[0, N] rows that still depend on ``x`` ([0, K]) and ``w`` [El, K, N]: zero-size backward."""
    return torch.mm(x.to(w.dtype), w[0])


def _local_fused(self: nn.Module, x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    offs = torch.cumsum(counts, 0).to(torch.int32)
    g1, g2 = w1.transpose(1, 2), w2.transpose(1, 2)
    if x.shape[0] == 0:  # nothing routed here: keep x and both weights in the graph
        return _connected_empty(self._apply_gate(_connected_empty(x, g1)), g2)
    h = self._apply_gate(moe.grouped_mm(x, g1, offs, counts, moe.FORCE_FALLBACK))
    return moe.grouped_mm(h, g2, offs, counts, moe.FORCE_FALLBACK)


def _local_eager(self: nn.Module, x: torch.Tensor, counts: list[int], w1: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """transformers' eager expert computation (gate/up linear, act(gate) * up, down linear) on the
    rows of each local expert (rows sorted by expert)."""
    outs, s = [], 0
    for e, c in enumerate(counts):
        if c:
            gate, up = F.linear(x[s:s + c], w1[e]).chunk(2, dim=-1)
            outs.append(F.linear(self.act_fn(gate) * up, w2[e]))
        s += c
    if not outs:
        g1, g2 = w1.transpose(1, 2), w2.transpose(1, 2)
        return _connected_empty(self._apply_gate(_connected_empty(x, g1)), g2)
    return torch.cat(outs)  # w1[e] / w2[e] backward fills the whole weight: rowless experts get 0


def ep_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    ctx: EPContext = self._omnitune_ep
    ep, el = ctx.ep, ctx.num_local
    dev = hidden_states.device
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)          # expert-major = destination-rank-major
    token = order // k
    counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts]
    recv_counts = torch.empty_like(counts)             # [ep * el]: from rank i, for my expert e
    dist.all_to_all_single(recv_counts, counts, group=ctx.group)
    send_c, recv_c = torch.stack([counts, recv_counts]).view(2, ep, el).tolist()   # one host sync
    send_splits, recv_splits = [sum(r) for r in send_c], [sum(r) for r in recv_c]
    local_counts = [sum(recv_c[i][e] for i in range(ep)) for e in range(el)]
    ctx.sent_rows += sum(send_splits) - send_splits[ctx.rank]

    x = all_to_all_single_autograd(hidden_states[token], recv_splits, send_splits, ctx.group)
    # received rows: source-rank-major, expert-major inside a source -> local-expert-major
    chunk = torch.repeat_interleave(torch.arange(ep * el, device=dev), recv_counts)
    perm = torch.argsort((chunk % el) * ep + chunk // el, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=dev)
    w1, w2 = _local(self.gate_up_proj), _local(self.down_proj)
    if ctx.fused:
        y = _local_fused(self, x[perm], torch.tensor(local_counts, device=dev), w1, w2)
    else:
        y = _local_eager(self, x[perm], local_counts, w1, w2)
    y = all_to_all_single_autograd(y[inv].contiguous(), send_splits, recv_splits, ctx.group)
    out = y * top_k_weights.reshape(-1)[order, None]
    final = torch.zeros_like(hidden_states)
    return final.index_add_(0, token, out.to(final.dtype))


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if EP_IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EP_IMPL_NAME, ep_experts_forward)


def uses_fused(module: nn.Module) -> bool:
    """Whether the module's experts implementation is a grouped GEMM (ours or transformers'), i.e.
    whether its local experts run fused under EP (eager and anything else: the per-expert loop)."""
    impl = module.config._experts_implementation
    if impl == EP_IMPL_NAME:
        return module._omnitune_ep.fused
    return impl in (moe.IMPL_NAME, "grouped_mm")


def check_ep_layout(module: nn.Module, ep: int) -> None:
    if not moe._layout_supported(module):
        raise ValueError(f"{type(module).__name__}: expert parallelism needs concatenated gate_up_proj "
                         f"[E, 2I, H] + down_proj [E, H, I] without bias")
    if module.num_experts % ep:
        raise ValueError(f"expert parallelism {ep}: the {module.num_experts} experts per layer are not divisible "
                         f"by it")


def set_ep(modules: list[nn.Module], group, ep: int) -> None:
    """Switch ``modules`` (experts whose weights are already split over ``group``) to the EP
    forward, keeping each one's fused/eager choice for its local experts."""
    register()
    fused = [uses_fused(m) for m in modules]   # read all first: modules share their config
    for m, f in zip(modules, fused):
        check_ep_layout(m, ep)
        m._omnitune_ep = EPContext(group=group, ep=ep, num_local=m.num_experts // ep, fused=f,
                                   rank=dist.get_rank(group))
        m.config._experts_implementation_internal = EP_IMPL_NAME
