"""Hetero parallel (``--hetero-parallel``, seed Qwen2.5-Omni): the LLM keeps the TP size of the
flags while an encoder whose model.json ``tp`` is 1 runs data-parallel over the LLM's TP group.

Why: an encoder's activations are small next to its work (a ViT's attention over many patches), so
splitting its heads over TP costs an all-reduce per block for little memory; data parallelism lets
each TP rank encode a different share of the micro-batch's images / audios instead.

How (one TP group of size T; every rank of it holds the same micro-batch):

1. the encoder is left out of the TP plan (its weights stay whole) and FSDP2 shards it over the
   flattened ``dp x cp x tp`` mesh instead of ``dp x cp``;
2. a forward pre-hook on the tower gives rank t the t-th contiguous share of the items (images /
   videos by ``grid_thw`` rows, audios by ``feature_lens``); a rank with an empty share encodes a
   dummy item (so its FSDP2 collectives still line up) whose output enters the graph times 0;
3. a forward hook all-gathers the shares' outputs over the TP group, so every rank sees every
   item's features in order. Its backward keeps only the rank's own rows: the gradient arriving at
   the gathered features is the same on every TP rank (the decoder's input gradient is all-reduced
   by TP), so no sum is needed there;
4. each rank's encoder gradient covers its own items only; summed over the TP group they are the
   micro-batch's gradient. FSDP2 reduces over the flat mesh with a sum divided by ``dp x cp`` (the
   mean over data-parallel ranks every other parameter gets), as the expert weights of EP do.

What runs here (checked before launch by :func:`plan_hetero`): encoder ``tp`` 1 (data-parallel) or
the LLM's TP (as without the flag); ``pp`` and ``cp`` 1; the micro-batch size a multiple of TP (the
seed's rule: each TP rank's share of the encoders is a whole number of samples); not with PP, CP,
EP, LoRA, DPO, packing, a token budget or meta-device init (not verified together yet).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from omnitune.config.errors import ConfigError

#: model.json encoder sections and the family accessor of their tower
ENCODERS = {"image_encoder": "vision_tower", "audio_encoder": "audio_tower"}


# ------------------------------------------------------------------------------------ before launch
def plan_hetero(args, dims, model_cfg, data_cfg, family, hf_config, source: str) -> list[str]:
    """Validate --hetero-parallel against the flags and model.json; set ``dims.hetero_dp`` (the
    encoder sections run data-parallel over TP). Returns the --dry-run lines."""
    sections = {name: getattr(model_cfg, name, None) for name in ENCODERS}
    sizes = {name: {k: (getattr(sec, k, None) if sec is not None else None) for k in ("tp", "pp", "cp")}
             for name, sec in sections.items()}
    if not args.hetero_parallel:
        runs = {"tp": dims.tp, "pp": 1, "cp": 1}
        notes = [f"{name}.{k} {v}" for name, s in sizes.items() for k, v in s.items()
                 if v is not None and v != runs[k]]
        return ([f"hetero     : off; {', '.join(notes)} in {source} apply with --hetero-parallel only (the "
                 f"encoders follow --tensor-model-parallel-size {dims.tp})"] if notes else [])
    bp = data_cfg.dataset_param.basic_parameters
    clash = ("--pipeline-model-parallel-size > 1" if dims.pp > 1
             else "--context-parallel-size > 1" if dims.cp > 1
             else "--expert-model-parallel-size > 1" if dims.ep > 1
             else "--lora-target-modules (LoRA)" if args.lora_target_modules
             else "data.json attr.ranking (DPO pairs)" if data_cfg.dataset_param.attr.ranking
             else "data.json basic_parameters.packing" if bp.packing
             else "--token-budget" if args.token_budget is not None
             else "--init-model-with-meta-device" if args.init_model_with_meta_device
             else None)
    if clash:
        raise ConfigError(f"--hetero-parallel: not with {clash} in this version (hetero parallel covers DP and TP); "
                          f"drop --hetero-parallel or that setting")
    dp_encoders = []
    for name, s in sizes.items():
        for key in ("pp", "cp"):
            if (s[key] or 1) != 1:
                raise ConfigError(f"{source}: {name}.{key} = {s[key]}: hetero parallel splits an encoder by data "
                                  f"(tp 1) or by the LLM's TP only; set {name}.{key} to 1")
        tp = 1 if s["tp"] is None else s["tp"]
        if tp not in (1, dims.tp):
            raise ConfigError(f"{source}: {name}.tp = {tp}: with --hetero-parallel an encoder runs data-parallel "
                              f"(tp 1) or with the LLM's --tensor-model-parallel-size {dims.tp}; set {name}.tp to "
                              f"1 or {dims.tp}")
        if tp == 1 and dims.tp > 1 and _has_tower(family, hf_config, name):
            dp_encoders.append(name)
    if dp_encoders and args.micro_batch_size % dims.tp:
        raise ConfigError(f"--micro-batch-size {args.micro_batch_size}: with --hetero-parallel it must be a "
                          f"multiple of --tensor-model-parallel-size {dims.tp} (each TP rank encodes an equal share "
                          f"of the micro-batch for the data-parallel {', '.join(dp_encoders)}); e.g. "
                          f"--micro-batch-size {dims.tp * max(1, args.micro_batch_size // dims.tp)}")
    dims.hetero_dp = tuple(dp_encoders)
    if not dp_encoders:
        return [f"hetero     : on; every encoder follows --tensor-model-parallel-size {dims.tp}"
                + (" (TP 1: nothing differs)" if dims.tp == 1 else "")]
    return [f"hetero     : {', '.join(dp_encoders)} data-parallel over each TP group ({dims.tp} ranks share a "
            f"micro-batch's items), FSDP2 over DP x CP x TP = {dims.dp_cp * dims.tp}; the LLM is TP {dims.tp}"]


def _has_tower(family, hf_config, section: str) -> bool:
    if section == "audio_encoder":
        return getattr(family.trainable_config(hf_config), "audio_config", None) is not None
    return True


# ------------------------------------------------------------------------------------------ at run
def tower_paths(hf: nn.Module, family, dims) -> dict[str, str]:
    """section -> module path (in ``hf``) of each data-parallel encoder tower."""
    out = {}
    for section in getattr(dims, "hetero_dp", ()):
        tower = getattr(family, ENCODERS[section])(hf)
        if tower is None:
            continue
        out[section] = next(n for n, m in hf.named_modules() if m is tower)
    return out


def apply_hetero(hf: nn.Module, family, dims) -> dict[str, str]:
    """Hook the data-parallel towers (see the module doc). Call before TP / FSDP2. Returns
    :func:`tower_paths`."""
    paths = tower_paths(hf, family, dims)
    group, rank, size = dims.mesh["tp"].get_group(), dims.tp_rank, dims.tp
    for section, path in paths.items():
        tower = hf.get_submodule(path)
        split = _split_vision if section == "image_encoder" else _split_audio
        _hook(tower, split, group, rank, size)
    return paths


def describe_towers(hf: nn.Module, family, dims) -> list[str]:
    """The run's log lines: how each data-parallel tower's weights are held (after FSDP2)."""
    from torch.distributed.tensor import DTensor

    out = []
    for section, path in tower_paths(hf, family, dims).items():
        tower = hf.get_submodule(path)
        meshes = {tuple(p.device_mesh.mesh_dim_names or ()) + (p.device_mesh.size(),)
                  for p in tower.parameters() if isinstance(p, DTensor)}
        plain = sum(1 for p in tower.parameters() if not isinstance(p, DTensor))
        held = ", ".join(f"{'x'.join(m[:-1])} ({m[-1]} ranks)" for m in sorted(meshes)) or "none"
        out.append(f"hetero     : {section} ({path}): not TP-split, FSDP2 over {held}"
                   + (f", {plain} plain tensors" if plain else ""))
    return out


def _shares(n: int, size: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) item ranges of ``size`` ranks (the first ``n % size`` get one more)."""
    base, extra = divmod(n, size)
    out, lo = [], 0
    for r in range(size):
        hi = lo + base + (r < extra)
        out.append((lo, hi))
        lo = hi
    return out


def _split_vision(tower, args, kwargs, rank, size):
    """(pixel rows, grid_thw) of this rank's share of the items; a dummy 1 x merge x merge grid when
    the share is empty. Returns (args, kwargs, empty)."""
    pixels = args[0] if args else kwargs.pop("hidden_states")
    grid = kwargs.pop("grid_thw") if "grid_thw" in kwargs else args[1]
    lo, hi = _shares(int(grid.shape[0]), size)[rank]
    if hi == lo:
        merge = tower.spatial_merge_size
        grid = torch.tensor([[1, merge, merge]], device=grid.device, dtype=grid.dtype)
        return (pixels.new_zeros(merge * merge, pixels.shape[-1]),), {**kwargs, "grid_thw": grid}, True
    rows = grid.prod(-1)
    start, stop = int(rows[:lo].sum()), int(rows[:hi].sum())
    return (pixels[start:stop],), {**kwargs, "grid_thw": grid[lo:hi]}, False


def _split_audio(tower, args, kwargs, rank, size):
    """(mel columns, feature_lens, aftercnn_lens) of this rank's share of the audios; one window of
    zeros when the share is empty. Returns (args, kwargs, empty)."""
    feats = args[0] if args else kwargs.pop("input_features")
    lens = kwargs.pop("feature_lens") if "feature_lens" in kwargs else args[1]
    after = kwargs.pop("aftercnn_lens", None) if len(args) < 3 else args[2]
    lo, hi = _shares(int(lens.shape[0]), size)[rank]
    if hi == lo:
        frames = 2 * tower.config.n_window
        lens_d = torch.tensor([frames], device=lens.device, dtype=lens.dtype)
        extra = {}
        if after is not None:
            extra["aftercnn_lens"] = (lens_d - 1) // 2 + 1
        return (feats.new_zeros(feats.shape[0], frames),), {**kwargs, "feature_lens": lens_d, **extra}, True
    start, stop = int(lens[:lo].sum()), int(lens[:hi].sum())
    extra = {"aftercnn_lens": after[lo:hi]} if after is not None else {}
    return (feats[:, start:stop],), {**kwargs, "feature_lens": lens[lo:hi], **extra}, False


def _hook(tower: nn.Module, split, group, rank: int, size: int) -> None:
    state = {}

    def pre(mod, args, kwargs):
        args, kwargs, state["empty"] = split(mod, tuple(args), dict(kwargs), rank, size)
        return args, kwargs

    def post(mod, args, kwargs, out):
        empty = state.pop("empty")
        deep = list(getattr(out, "deepstack_features", None) or ())
        keys = ("pooler_output",) if split is _split_vision else ("last_hidden_state", "pooler_output")
        fields = {k: getattr(out, k) for k in keys if getattr(out, k, None) is not None}
        # a vision tower's last_hidden_state (per patch, before the merger) is not used by the
        # families: it is dropped, not gathered; an audio tower's two fields are often one tensor
        zero = sum(t.sum() for t in [*fields.values(), *deep]) * 0.0 if empty else None
        done: dict[int, torch.Tensor] = {}

        def gather(t):
            if id(t) not in done:
                g = _gather(t[:0] if empty else t, group, rank, size)
                done[id(t)] = g if zero is None else g + zero   # an empty share keeps the dummy's graph
            return done[id(t)]

        res = {k: gather(t) for k, t in fields.items()}
        if deep:
            res["deepstack_features"] = [gather(t) for t in deep]
        return type(out)(**res)

    tower.register_forward_pre_hook(pre, with_kwargs=True)
    tower.register_forward_hook(post, with_kwargs=True)


class _GatherRows(torch.autograd.Function):
    """All-gather of variable-length row blocks over ``group``; backward: this rank's rows of the
    (TP-replicated) gradient."""

    @staticmethod
    def forward(ctx, local, counts, rank, group):
        ctx.lo, ctx.n = sum(counts[:rank]), counts[rank]
        most = max(counts)
        buf = local.new_zeros((most, *local.shape[1:]))
        buf[:local.shape[0]] = local
        parts = [torch.empty_like(buf) for _ in counts]
        dist.all_gather(parts, buf.contiguous(), group=group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.lo:ctx.lo + ctx.n], None, None, None


def _gather(local: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n, group=group)
    return _GatherRows.apply(local, [int(c) for c in counts], rank, group)
