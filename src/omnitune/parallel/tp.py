"""Tensor parallelism with DTensor, torchtitan style: each family declares a plan (module path
pattern -> style name, ``family.tp_plan(model)`` in ``models/<family>/tp.py``) and :func:`apply_tp`
applies it with ``parallelize_module`` on the TP mesh. Call it after freezing and ``TrainModel``,
before ``apply_fsdp`` (FSDP2 then shards the TP DTensors over dp_cp: 2-D (dp_cp, tp) parameters).

Styles (the plan's values; a tuple applies several to one module):

- ``colwise`` / ``rowwise``: ``ColwiseParallel`` / ``RowwiseParallel`` with local outputs, so HF
  code that views with ``-1`` heads sees its local heads (a colwise output is sharded on the last
  dim, a rowwise output is all-reduced and replicated).
- ``rowwise_seq``: the decoder's o_proj / down_proj; ``rowwise`` without sequence parallel, with it
  the output is reduce-scattered onto the sequence (a Shard(1) DTensor).
- ``colwise_qkv``: a fused [q; k; v] Linear (vision towers): rank r must compute q, k and v of its
  own heads (a plain colwise would give rank 0 all of q). The weight is stored Shard(0) unpermuted
  and the output is exchanged to the per-head ``_StridedShard(-1, split_factor=3)`` layout (DTensor
  does that as an all-gather of the [S, 3H] output and a local slice).
- ``embedding``: vocabulary-parallel ``nn.Embedding`` (rows sharded; :mod:`omnitune.ops.vocab_parallel`).
- ``lm_head``: weight sharded on the vocabulary (Shard(0)); the loss reads the weight and keeps the
  logits sharded (``train.loss.token_losses`` -> vocab-parallel cross-entropy). Calling the module
  returns logits as a DTensor sharded on the vocabulary.
- ``head_norm``: a norm applied per head after the colwise q/k projection (Qwen3 q_norm/k_norm): its
  weight becomes a Replicate DTensor and its input a DTensor sharded on the heads dim (-2), so the
  weight gradient (a sum over all heads) is Partial and is reduced over TP (FSDP2 does it when it
  reduces the gradient; without FSDP2 a post-accumulate hook does).
- ``heads:attr1,attr2``: divide those head-count attributes of the module by the TP size (HF vision
  and audio attention reshape with ``self.num_heads``).
- ``sp_layer``, ``sp_norm``, ``sp_gather``, ``sp_gather_scatter``: sequence parallel, no-ops unless
  ``sequence_parallel=True``. A decoder layer's input is sliced on the sequence (Shard(1)), its
  norms run on the slice (``SequenceParallel``), attention / MLP gather the full sequence
  (``sp_gather``; ``sp_gather_scatter`` also slices the output again, for MoE blocks whose experts
  stay replicated), and the layer output is gathered back, so everything outside the decoder
  layers (embedding merge of image/audio features, DeepStack, final norm, loss) sees full sequences.
  What it saves is the norms' activations only (the colwise inputs are saved gathered):
  bench/tp_sp_memory.py measured 0.88x the decoder layers' saved bytes (Qwen2-VL bench size, TP2),
  for an all-gather + reduce-scatter in place of each all-reduce. Off by default.

Parameters the plan does not touch stay plain and replicated: every TP rank computes the same
values and gets the same gradients for them (norms, patch embed, MoE experts and router, ...).

Tied embeddings (Qwen2-VL tiny / small checkpoints: lm_head.weight is embed_tokens.weight) stay one
Parameter: both styles shard it Shard(0); the second copy is dropped and the first re-registered.

After TP + FSDP2 the parameters are DTensors on different meshes ((dp_cp, tp) for the sharded ones,
dp_cp for the rest), so gradient clipping must be :func:`omnitune.parallel.grad.clip_grad_norm_`
(``torch.nn.utils.clip_grad_norm_`` fails: "aten.stack ... must have the same mesh").
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.distributed.tensor.placement_types import _StridedShard


# ----------------------------------------------------------------------------------------- styles
class FusedColwiseParallel(ColwiseParallel):
    """Colwise for a Linear whose output features are ``chunks`` equal blocks (e.g. [q; k; v]), each
    to be split over TP. The weight / bias are plain Shard(0) (contiguous rows: the layout DCP
    checkpoints and FSDP2 compose with); the output, sharded on its last dim in that contiguous
    order, is redistributed to ``_StridedShard(-1, split_factor=chunks)`` so that rank r holds
    [q_r, k_r, v_r] of its own heads, which the HF ``reshape(S, 3, local heads, -1)`` splits right.
    (Storing the weight itself strided would save that exchange but DCP cannot save such shards:
    "overlapping chunks".)"""

    def __init__(self, chunks: int = 3):
        super().__init__(use_local_output=True)
        self.chunks = chunks

    def _apply(self, module, device_mesh):
        if not isinstance(module, nn.Linear) or module.out_features % (self.chunks * device_mesh.size()):
            raise ValueError(f"colwise_qkv: {module} is not a Linear whose {self.chunks} output blocks divide "
                             f"by TP {device_mesh.size()}")
        self.output_layouts = (_StridedShard(-1, split_factor=self.chunks),)
        return super()._apply(module, device_mesh)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        sf = output_layouts[0].split_factor
        outputs = outputs.redistribute(placements=[_StridedShard(outputs.ndim - 1, split_factor=sf)])
        return outputs.to_local()


class VocabParallelEmbedding(ParallelStyle):
    """nn.Embedding with its rows (vocabulary) sharded over TP; output replicated, plain tensor
    (the module becomes an :class:`omnitune.ops.vocab_parallel.VocabParallelEmbedding`)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        from omnitune.ops.vocab_parallel import VocabParallelEmbedding as Module

        if type(module) is not nn.Embedding:
            raise NotImplementedError(f"embedding style needs an nn.Embedding, got {type(module).__name__}")
        if module.max_norm is not None or module.sparse:
            raise NotImplementedError("vocab-parallel embedding: max_norm / sparse are not supported")
        w = module.weight
        module.register_parameter("weight", nn.Parameter(
            distribute_tensor(w, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank),
            requires_grad=w.requires_grad))
        module.__class__ = Module
        return module


def _replicate_partial_grad(p: torch.Tensor) -> None:
    """Post-accumulate hook: a Partial gradient of a Replicate parameter is all-reduced (only fires
    without FSDP2, which registers its own parameters and reduces such gradients itself)."""
    g = p.grad
    if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
        p.grad = g.redistribute(placements=p.placements)


class HeadNorm(SequenceParallel):
    """A per-head norm on a [..., heads, head_dim] input whose heads are split over TP."""

    def __init__(self):
        super().__init__(sequence_dim=-2, use_local_output=True)

    def _apply(self, module, device_mesh):
        module = super()._apply(module, device_mesh)
        for p in module.parameters(recurse=False):
            p.register_post_accumulate_grad_hook(_replicate_partial_grad)
        return module


class LocalHeads(ParallelStyle):
    """Divide head-count attributes by the TP size (the module reshapes with them)."""

    def __init__(self, attrs: tuple[str, ...]):
        super().__init__()
        self.attrs = attrs

    def _apply(self, module, device_mesh):
        tp = device_mesh.size()
        for a in self.attrs:
            v = getattr(module, a)
            if v % tp:
                raise ValueError(f"{type(module).__name__}.{a} = {v} is not divisible by TP {tp}")
            setattr(module, a, v // tp)
        return module


def _hidden_arg(args, kwargs):
    """(where, value) of a module's hidden-states input: the first positional or ``hidden_states``."""
    if args:
        return 0, args[0]
    return "hidden_states", kwargs.get("hidden_states")


def _set_hidden(args, kwargs, where, value):
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def _first(outputs):
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _replace_first(outputs, value):
    return (value, *outputs[1:]) if isinstance(outputs, tuple) else value


class SeqParallelLayer(ParallelStyle):
    """Decoder layer under sequence parallel: full input -> Shard(1) DTensor; output -> full plain."""

    def _apply(self, module, device_mesh):
        def pre(mod, args, kwargs):
            where, h = _hidden_arg(args, kwargs)
            if not isinstance(h, DTensor):
                h = DTensor.from_local(h, device_mesh, [Replicate()], run_check=False)
            return _set_hidden(args, kwargs, where, h.redistribute(device_mesh, [Shard(1)]))

        def post(mod, args, kwargs, outputs):
            h = _first(outputs)
            if isinstance(h, DTensor):
                h = h.redistribute(device_mesh, [Replicate()]).to_local()
                if h._is_view():   # HF code may write into the layer output in place (Qwen3-VL DeepStack),
                    h = h.clone()  # which on a view would drop FSDP2's pre-backward hook
            return _replace_first(outputs, h)

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)
        return module


class SeqGather(ParallelStyle):
    """Attention / MLP under sequence parallel: a Shard(1) DTensor input becomes the full plain
    tensor. ``scatter_output``: the (plain, full) output is sliced back to a Shard(1) DTensor."""

    def __init__(self, scatter_output: bool = False):
        super().__init__()
        self.scatter_output = scatter_output

    def _apply(self, module, device_mesh):
        def pre(mod, args, kwargs):
            where, h = _hidden_arg(args, kwargs)
            if isinstance(h, DTensor):
                h = h.redistribute(device_mesh, [Replicate()]).to_local()
            return _set_hidden(args, kwargs, where, h)

        module.register_forward_pre_hook(pre, with_kwargs=True)
        if self.scatter_output:
            def post(mod, args, kwargs, outputs):
                h = _first(outputs)
                if not isinstance(h, DTensor):
                    h = DTensor.from_local(h, device_mesh, [Replicate()], run_check=False)
                    h = h.redistribute(device_mesh, [Shard(1)])
                return _replace_first(outputs, h)

            module.register_forward_hook(post, with_kwargs=True)
        return module


class _Skip(ParallelStyle):
    def _apply(self, module, device_mesh):
        return module


def make_style(name: str, sequence_parallel: bool = False) -> ParallelStyle:
    """The ParallelStyle for one plan value (see the module docstring)."""
    if name.startswith("heads:"):
        return LocalHeads(tuple(a.strip() for a in name[len("heads:"):].split(",") if a.strip()))
    if name.startswith("sp_") and not sequence_parallel:
        return _Skip()
    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "rowwise_seq": lambda: (RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
                                if sequence_parallel else RowwiseParallel()),
        "colwise_qkv": lambda: FusedColwiseParallel(3),
        "embedding": VocabParallelEmbedding,
        "lm_head": lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        "head_norm": HeadNorm,
        "sp_layer": SeqParallelLayer,
        "sp_norm": lambda: SequenceParallel(sequence_dim=1),
        "sp_gather": lambda: SeqGather(False),
        "sp_gather_scatter": lambda: SeqGather(True),
    }
    if name not in styles:
        raise ValueError(f"unknown TP style {name!r}; known: {sorted(styles)} and heads:<attrs>")
    return styles[name]()


# ------------------------------------------------------------------------------------------ plans
def _pattern_re(pattern: str) -> re.Pattern:
    """``*`` matches exactly one path segment."""
    return re.compile("^" + r"\.".join("[^.]+" if s == "*" else re.escape(s) for s in pattern.split(".")) + "$")


def resolve_plan(model: nn.Module, plan: dict, partial: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """[(module path, style names)] in plan order; raises when a pattern matches no module (a stale
    path) so a renamed HF module cannot silently stay unsharded. ``partial`` (a pipeline stage,
    parallel/pp.py): modules the stage does not hold (no parameters here) are skipped, and a pattern
    may match nothing."""
    names = [n for n, m in model.named_modules() if not partial or any(True for _ in m.parameters())]
    out = []
    for pattern, styles in plan.items():
        styles = (styles,) if isinstance(styles, str) else tuple(styles)
        rx = _pattern_re(pattern)
        hits = [n for n in names if rx.match(n)]
        if not hits and not partial:
            raise ValueError(f"TP plan pattern {pattern!r} matches no module of {type(model).__name__}")
        out.extend((n, styles) for n in hits)
    return out


def _tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of (module path, param name) that share one Parameter object."""
    seen: dict[int, list[tuple[str, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            seen.setdefault(id(p), [])
            if (mname, pname) not in seen[id(p)]:
                seen[id(p)].append((mname, pname))
    return [locs for locs in seen.values() if len(locs) > 1]


def apply_tp(model: nn.Module, family, tp_mesh, sequence_parallel: bool = False,
             skip: tuple[str, ...] = ()) -> nn.Module:
    """Shard ``model`` (a TrainModel or the HF model) over the 1-D ``tp_mesh`` by ``family.tp_plan``,
    except the modules under the paths in ``skip`` (--hetero-parallel's data-parallel encoders).
    No-op when the mesh has one rank. Returns the model (modified in place)."""
    if tp_mesh is None or tp_mesh.size() == 1:
        return model
    hf = getattr(model, "hf", model)
    plan = family.tp_plan(hf)
    ties = _tied_parameters(hf)
    for path, styles in resolve_plan(hf, plan, partial=getattr(model, "partial_model", False)):
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        mod = hf.get_submodule(path)
        for s in styles:
            parallelize_module(mod, tp_mesh, make_style(s, sequence_parallel))
    for locs in ties:   # re-tie: the first location's (sharded) parameter everywhere
        (m0, p0), rest = locs[0], locs[1:]
        keep = getattr(hf.get_submodule(m0), p0)
        for m, p in rest:
            mod = hf.get_submodule(m)
            other = getattr(mod, p)
            if other is keep:
                continue
            kp = keep.placements if isinstance(keep, DTensor) else None
            op = other.placements if isinstance(other, DTensor) else None
            if kp != op or keep.shape != other.shape:
                raise ValueError(f"tied parameter {m0}.{p0} / {m}.{p}: the TP plan gives them different "
                                 f"layouts ({kp} vs {op}); give both the same sharding")
            mod.register_parameter(p, keep)
    return model


#: styles that shard their module's weight (and, column-wise, its bias) over the TP ranks
_SHARDING = {"colwise": ("weight", "bias"), "colwise_qkv": ("weight", "bias"), "lm_head": ("weight", "bias"),
             "embedding": ("weight",), "rowwise": ("weight",), "rowwise_seq": ("weight",)}


def tp_sharded_parameter_names(model: nn.Module, family) -> list[str]:
    """Names of the parameters ``family.tp_plan`` splits over the TP ranks (for the memory estimate
    of ``--dry-run``; works on a meta-device model)."""
    out = []
    for path, styles in resolve_plan(model, family.tp_plan(model)):
        mod = model.get_submodule(path)
        for s in styles:
            for pname in _SHARDING.get(s, ()):
                if getattr(mod, pname, None) is not None:
                    out.append(f"{path}.{pname}" if path else pname)
    return out
