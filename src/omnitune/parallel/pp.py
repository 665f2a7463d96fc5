"""Pipeline parallelism (``--pipeline-model-parallel-size``, ``--virtual-pipeline-model-parallel-size``)
with ``torch.distributed.pipelining``: 1F1B for PP, interleaved 1F1B for VPP.

Stages come from model.json ``pipeline_num_layers`` (the lists mm-convert's ``llm_pp_layers`` /
``vit_pp_layers`` use; with VPP a list of lists, chunk-major: stage = chunk x PP + PP rank). What
runs where:

- the first stage: the vision / audio encoders (all their layers: a list other than ``[N, 0, ...]``
  is refused), the word embedding, the media merge and the mRoPE position ids (the HF model's own
  forward), then its text layers;
- every stage: its text layers, by the HF text decoder's own forward (layers of other stages are
  pass-through placeholders, so layer indices, causal masks, rotary embeddings and Qwen3-VL's
  DeepStack injection points stay those of the HF code);
- the last stage: the final norm, lm_head and the loss of train/loss.py (the step's weights are the
  non-pipelined step's, so every loss type means the same).

Each stage is its own pruned copy of the HF model (torchtitan's "model parts"): parameter names
stay the full model's, so checkpoints are layout-free (a PP2 save resumes at PP1 and the reverse) and
an mm folder of any layout feeds the stage that owns each tensor. A tied lm_head / embedding lives on
the first and the last stage; their gradients are summed over the two after each backward and the
checkpoint stores it once, under the embedding's name.

What flows between stages (float tensors of one shape per step, batch first): the hidden states
[B, S, H], the micro-batch index [B, 1], the position ids [B, 3, S] and, for DeepStack families,
the visual-token mask [B, S] and one dense [B, S, H] tensor per DeepStack level (features scattered
to their token positions, zeros elsewhere). The rest of a micro-batch (mask, labels, loss weights)
every stage reads from its own copy: all ranks of a pipeline read the same samples. The schedules
need one shape per step: the step's micro-batches are padded to its longest (rounded up to 64) and a
schedule is built per shape.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from omnitune.config.errors import ConfigError

PAD_MULTIPLE = 64


@dataclass(frozen=True)
class StageSpec:
    index: int          # global stage index (chunk x pp + pp rank)
    lm: tuple[int, int]  # text layers [lo, hi)
    first: bool          # encoders, embedding, media merge
    last: bool           # final norm, lm_head, loss

    def describe(self, pp: int) -> str:
        what = []
        if self.first:
            what.append("vision/audio encoders + embedding")
        lo, hi = self.lm
        what.append(f"text layers {lo}-{hi - 1}" if hi > lo else "no text layer")
        if self.last:
            what.append("norm + lm_head + loss")
        return f"stage {self.index} (PP rank {self.index % pp}, chunk {self.index // pp}): " + ", ".join(what)


def _flat(value, name: str, pp: int, vpp: int, source: str) -> list[int]:
    n = pp * vpp
    if value and isinstance(value[0], list):
        if len(value) != vpp or any(len(v) != pp for v in value):
            raise ConfigError(f"{source}: {name}.pipeline_num_layers {value}: with --pipeline-model-parallel-size {pp}"
                              f" and --virtual-pipeline-model-parallel-size {vpp} give {vpp} lists of {pp} numbers "
                              f"(chunk-major)")
        flat = [x for v in value for x in v]
    else:
        if vpp > 1:
            raise ConfigError(f"{source}: {name}.pipeline_num_layers {value}: with --virtual-pipeline-model-parallel-size"
                              f" {vpp} give a list of {vpp} lists (one per chunk) of {pp} numbers")
        flat = list(value)
    if len(flat) != n:
        raise ConfigError(f"{source}: {name}.pipeline_num_layers {value} has {len(flat)} entries but the pipeline has "
                          f"{n} stages (--pipeline-model-parallel-size {pp}"
                          + (f" x --virtual-pipeline-model-parallel-size {vpp}" if vpp > 1 else "") + ")")
    if any(x < 0 for x in flat):
        raise ConfigError(f"{source}: {name}.pipeline_num_layers {value}: layer counts must be >= 0")
    return flat


def stage_specs(family, hf_config, model_cfg, pp: int, vpp: int, source: str) -> list[StageSpec]:
    """The stages of a ``pp`` x ``vpp`` pipeline from model.json, checked (ConfigError naming the field)."""
    n = pp * vpp
    sizes = family.structure_sizes(hf_config)
    modules = model_cfg.modules()
    n_text = sizes.get("text_decoder.num_layers")
    text = modules.get("text_decoder")
    if text is not None and text.pipeline_num_layers is not None:
        lm = _flat(text.pipeline_num_layers, "text_decoder", pp, vpp, source)
        if sum(lm) != n_text:
            raise ConfigError(f"{source}: text_decoder.pipeline_num_layers sums to {sum(lm)} but the model has "
                              f"{n_text} layers")
    else:   # even split, the remainder on the last stages (the first also runs the encoders)
        base, extra = divmod(n_text, n)
        lm = [base + (1 if i >= n - extra else 0) for i in range(n)]
    for name, mod in modules.items():
        if name == "text_decoder" or mod.pipeline_num_layers is None:
            continue
        enc = _flat(mod.pipeline_num_layers, name, pp, vpp, source)
        if any(enc[1:]):
            text_first = lm[0] > 0
            raise ConfigError(f"{source}: {name}.pipeline_num_layers {mod.pipeline_num_layers}: " + (
                "the encoder's layers must all come before the text decoder's (seed rule: a stage may not hold text "
                "layers while encoder layers remain); " if text_first else "") +
                f"omnitune runs the whole encoder on the first stage; use [{sum(enc)}" + ", 0" * (n - 1) + "]"
                + (" (chunk-major lists with VPP)" if vpp > 1 else ""))
    specs, lo = [], 0
    for i, k in enumerate(lm):
        specs.append(StageSpec(i, (lo, lo + k), i == 0, i == n - 1))
        lo += k
    return specs


def check_pipeline(args, dims, grad_acc: int, source_flags: str = "--global-batch-size") -> None:
    """Schedule rules on the batch: 1F1B needs at least PP micro-batches per step; interleaved 1F1B a
    multiple of PP."""
    pp, vpp = dims.pp, args.virtual_pipeline_model_parallel_size or 1
    if grad_acc < pp:
        raise ConfigError(f"--pipeline-model-parallel-size {pp}: a step has {grad_acc} micro-batch(es) per pipeline "
                          f"(global batch / (micro batch x DP)); the schedule needs at least {pp}: raise "
                          f"{source_flags} to {pp * args.micro_batch_size * dims.dp} or more")
    if vpp > 1 and grad_acc % pp:
        raise ConfigError(f"--virtual-pipeline-model-parallel-size {vpp}: interleaved 1F1B needs the micro-batches "
                          f"per step ({grad_acc}) to be a multiple of --pipeline-model-parallel-size {pp}; change "
                          f"{source_flags}")


# ----------------------------------------------------------------------------------- pruning
class _PassThrough(nn.Module):
    """A text layer held by another stage: returns its hidden states unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Elsewhere(nn.Module):
    """A module held by another pipeline stage (no parameters here)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} is held by another pipeline stage")


def _set_module(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for name, mod in root.named_modules():
        if mod is target and name:
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, attr, new)
            return
    raise ValueError("module not found in the model")


def prune_for_stage(hf: nn.Module, family, spec: StageSpec) -> nn.Module:
    """Keep only what ``spec`` runs (in place; returns ``hf``)."""
    lm = family.language_model(hf)
    lo, hi = spec.lm
    for i in range(len(lm.layers)):
        if not lo <= i < hi:
            lm.layers[i] = _PassThrough()
    if not spec.last:
        lm.norm = nn.Identity()
        _set_module(hf, family.lm_head(hf), _Elsewhere("lm_head"))
    if not spec.first:
        lm.embed_tokens = _Elsewhere("embed_tokens")
        _set_module(hf, family.vision_tower(hf), _Elsewhere("the vision encoder"))
        audio = family.audio_tower(hf)
        if audio is not None:
            _set_module(hf, audio, _Elsewhere("the audio encoder"))
    return hf


def stage_fsdp_units(hf: nn.Module) -> list[nn.Module]:
    """FSDP2 units of a stage model: the outermost transformers layers it holds (the vision / audio
    blocks and text decoder layers the families' ``fsdp_units`` list, minus other stages' ones)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    out = []

    def walk(m):
        for c in m.children():
            if isinstance(c, GradientCheckpointingLayer):
                out.append(c)
            else:
                walk(c)
    walk(hf)
    return out


def deepstack_levels(hf: nn.Module, family) -> int:
    vc = getattr(family.vision_tower(hf), "config", None)
    return len(getattr(vc, "deepstack_visual_indexes", None) or ())


# ----------------------------------------------------------------------------------- stages
class StepTable:
    """This step's micro-batches (padded, on device) and what the last stage records."""

    def __init__(self):
        self.batches: list[dict] = []
        self.scale = 1.0
        self.loss_parts: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}


def _stage_module_class():
    from omnitune.train.model import TrainModel

    class StageModule(TrainModel):
        """One pipeline stage: a pruned HF model and the forward of its part (see the module doc)."""

        partial_model = True

        def __init__(self, hf, family, model_cfg, spec: StageSpec, table: StepTable, n_deep: int):
            super().__init__(hf, family, model_cfg)
            self.spec, self.table, self.n_deep = spec, table, n_deep

        def forward(self, *acts):
            fam, spec = self.family, self.spec
            lm = fam.language_model(self.hf)
            lo, hi = spec.lm
            idx = acts[0] if spec.first else acts[1]
            i = _index(idx, len(self.table.batches))
            batch = self.table.batches[i]
            if spec.first:
                captured = {}

                def hook(mod, args, kwargs):
                    captured.update(kwargs)
                    deeps = kwargs.get("deepstack_visual_embeds")
                    if deeps is not None:   # this stage's layers only: later stages add theirs
                        kwargs = dict(kwargs, deepstack_visual_embeds=[
                            d if lo <= j < hi else torch.zeros_like(d) for j, d in enumerate(deeps)])
                    return args, kwargs
                handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
                try:
                    hidden, aux = fam.forward_hidden(self.hf, batch)
                finally:
                    handle.remove()
                hidden = hidden + aux.to(hidden.dtype)   # 0 x dummy encoder outputs: keeps them in the graph
                pos = captured.get("position_ids")
                B, S = hidden.shape[:2]
                if pos is None:   # text only: the text decoder's own default, 0..S-1 on every axis
                    pos = torch.arange(S, device=hidden.device).view(1, 1, -1).expand(3, B, -1)
                elif pos.ndim == 2:
                    pos = pos[None].expand(3, -1, -1)
                pos_f = pos.permute(1, 0, 2).to(hidden.dtype)
                extra = []
                if self.n_deep:
                    mask = captured.get("visual_pos_masks")
                    deeps = captured.get("deepstack_visual_embeds")
                    B, S, H = hidden.shape
                    if mask is None or deeps is None:
                        extra = [hidden.new_zeros(B, S)] + [hidden.new_zeros(B, S, H) for _ in range(self.n_deep)]
                    else:
                        extra = [mask.to(hidden.dtype)]
                        for d in deeps:
                            dense = hidden.new_zeros(B, S, H)
                            dense[mask] = d.to(hidden.dtype)
                            extra.append(dense)
            else:
                hidden, pos_f = acts[0], acts[2]
                pos = pos_f.permute(1, 0, 2).round().long()
                kwargs = dict(inputs_embeds=hidden, attention_mask=batch.get("attention_mask"), position_ids=pos,
                              use_cache=False)
                extra = list(acts[3:])
                if self.n_deep:
                    mask = extra[0] > 0.5
                    if bool(mask.any()):
                        kwargs["visual_pos_masks"] = mask
                        kwargs["deepstack_visual_embeds"] = [
                            extra[1 + j][mask] if lo <= j < hi else hidden.new_zeros(int(mask.sum()), hidden.shape[-1])
                            for j in range(self.n_deep)]
                hidden = lm(**kwargs).last_hidden_state
            if not spec.last:
                return (hidden, idx, pos_f, *extra)
            from omnitune.train.loss import token_losses
            loss_sum, n = token_losses(hidden, fam.lm_head(self.hf), batch["labels"], batch.get("loss_weights"),
                                       self.compute_mode, self.chunk_size)
            self.table.loss_parts[i] = loss_sum.detach()
            self.table.counts[i] = n.detach() if torch.is_tensor(n) else torch.tensor(float(n))
            return loss_sum * self.table.scale

    return StageModule


def build_stage_modules(hf: nn.Module, family, model_cfg, specs: list[StageSpec], pp_rank: int, pp: int,
                        table: StepTable) -> list[nn.Module]:
    """This rank's stage modules (chunk order), each a pruned copy of ``hf`` (the last one is ``hf``)."""
    mine = [s for s in specs if s.index % pp == pp_rank]
    n_deep = deepstack_levels(hf, family)
    cls = _stage_module_class()
    out = []
    for k, spec in enumerate(mine):
        part = hf if k == len(mine) - 1 else copy.deepcopy(hf)
        out.append(cls(prune_for_stage(part, family, spec), family, model_cfg, spec, table, n_deep))
    return out


def pad_micro_batches(micro: list[dict], pad_id: int, group=None) -> list[dict]:
    """Pad every micro-batch to one [B, S] (the step's largest, S rounded up to PAD_MULTIPLE): padded
    positions are masked, untrained, weight 0; padded rows likewise. ``group`` (the data-parallel
    ranks of a stage): the largest over those ranks, so they all run the schedule of the same shape
    (a shape seen first makes the stages infer their inputs with an extra forward; if only some
    data-parallel ranks did it, their FSDP2 all-gathers would no longer pair up: a Qwen2.5-Omni
    PP2 x DP2 run aborted with "Received data size doesn't match expected size")."""
    B = max(mb["input_ids"].shape[0] for mb in micro)
    S = max(mb["input_ids"].shape[1] for mb in micro)
    S = -(-S // PAD_MULTIPLE) * PAD_MULTIPLE
    if group is not None and dist.get_world_size(group) > 1:
        shape = torch.tensor([B, S], dtype=torch.long, device=micro[0]["input_ids"].device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=group)
        B, S = int(shape[0]), int(shape[1])
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "loss_weights": 0.0, "mm_token_type_ids": 0}
    out = []
    for mb in micro:
        mb = dict(mb)
        b, s = mb["input_ids"].shape
        for k, fill in fills.items():
            v = mb.get(k)
            if v is None or not torch.is_tensor(v) or v.dim() != 2 or v.shape != (b, s):
                continue
            new = v.new_full((B, S), fill)
            new[:b, :s] = v
            mb[k] = new
        out.append(mb)
    return out


class PipelineRunner:
    """Runs one step's micro-batches through this rank's stages (a schedule per batch shape)."""

    def __init__(self, stages: list[nn.Module], n_stages: int, dims, device, vpp: int):
        self.stages, self.n_stages, self.dims, self.device, self.vpp = stages, n_stages, dims, device, vpp
        self.table = stages[0].table
        self._schedules: dict = {}
        self.is_last = any(s.spec.last for s in stages)
        self.is_first = any(s.spec.first for s in stages)

    def _schedule(self, key, n_micro: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        if key not in self._schedules:
            group = self.dims.group("pp")
            ps = [PipelineStage(m, m.spec.index, self.n_stages, self.device, group=group) for m in self.stages]
            loss_fn = _identity_loss
            if self.vpp == 1:
                sch = Schedule1F1B(ps[0], n_micro, loss_fn=loss_fn, scale_grads=False)
            else:
                sch = ScheduleInterleaved1F1B(ps, n_micro, loss_fn=loss_fn, scale_grads=False)
            self._schedules[key] = sch
        return self._schedules[key]

    def step(self, micro: list[dict], scale: float, train: bool = True) -> dict[int, torch.Tensor]:
        """Forward (+ backward when ``train``) of every micro-batch; returns {micro-batch: loss sum}
        on the last stage (empty elsewhere)."""
        t = self.table
        t.batches, t.scale, t.loss_parts, t.counts = micro, scale, {}, {}
        B, S = micro[0]["input_ids"].shape
        sch = self._schedule((B, S, len(micro)), len(micro))
        args = [(torch.full((B, 1), float(i), device=self.device),) for i in range(len(micro))] \
            if self.is_first else None
        targets = [torch.zeros(1, device=self.device) for _ in micro]
        try:
            if train:
                sch.step(arg_mbs=args, target_mbs=targets, losses=[], return_outputs=False)
            else:
                sch.eval(arg_mbs=args, target_mbs=targets, losses=[])
            return dict(t.loss_parts)
        finally:
            t.batches = []


class StagesModel(nn.Module):
    """This rank's stages where the trainer expects one model: ``hf`` is the list of their HF parts
    (checkpoints merge them: their tensor names are disjoint, each the full model's)."""

    router_aux_coef = 0.0

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(stages)
        self.settings_report = stages[0].settings_report
        self.hf = [s.hf for s in stages]

    def set_requires_gradient_sync(self, *a, **k) -> None:
        """The schedule defers FSDP2's gradient reduction to each stage's last backward itself."""



def _index(idx: torch.Tensor, n: int) -> int:
    """The micro-batch index a stage received. The schedule's first run of a new shape infers the
    stage's output shapes by calling it on uninitialised tensors: any value then stands for batch 0
    (only shapes matter there)."""
    v = float(idx[0, 0])
    return int(v) if v == v and 0 <= v < n and v == int(v) else 0


def _identity_loss(output, target):
    return output


# ----------------------------------------------------------------------------------- ties
def tied_stage_parameters(stages: list[nn.Module]) -> list[nn.Parameter]:
    """The tied embedding / lm_head parameter on this rank's first or last stage (each holds a copy)."""
    out = []
    for m in stages:
        if not _any_tied([m]):
            continue
        hf, fam = m.hf, m.family
        if m.spec.first and not m.spec.last:
            out.append(fam.language_model(hf).embed_tokens.weight)
        elif m.spec.last and not m.spec.first:
            out.append(fam.lm_head(hf).weight)
    return out


class TiedGradSync:
    """Sums the tied embedding / lm_head gradient over the first and last stage (collective over
    every rank: each first/last pair of one (dp, cp, tp) coordinate has its own group)."""

    def __init__(self, dims, stages):
        self.params = [p for p in tied_stage_parameters(stages) if p.requires_grad]
        self.group = None
        if not _any_tied(stages):   # from the config: the same on every rank (new_group is collective)
            return
        last = dims.pp - 1
        for d in range(dims.dp):
            for c in range(dims.cp):
                for t in range(dims.tp):
                    ranks = [((p * dims.dp + d) * dims.cp + c) * dims.tp + t for p in (0, last)]
                    g = dist.new_group(ranks)
                    if dims.rank in ranks:
                        self.group = g

    def __call__(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad
            local = g.to_local() if hasattr(g, "to_local") else g
            dist.all_reduce(local, group=self.group)


def _any_tied(stages) -> bool:
    cfg = stages[0].hf.config
    return bool(getattr(cfg, "tie_word_embeddings", False)
                or getattr(getattr(cfg, "text_config", None), "tie_word_embeddings", False))


def trainable_per_stage(model: nn.Module, family, specs: list[StageSpec]) -> dict[int, int]:
    """Trainable parameter count of each stage of ``model`` (meta device is fine), tied weights once
    per stage that holds them."""
    out = {}
    for spec in specs:
        part = prune_for_stage(copy.deepcopy(model), family, spec)
        out[spec.index] = sum(p.numel() for p in part.parameters() if p.requires_grad)
    return out
