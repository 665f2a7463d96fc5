"""The training loop (one loop; SFT now, DPO later plugs in its loss).

Entry point: ``torchrun --nproc_per_node N -m omnitune.train --mm-data data.json --mm-model
model.json ...`` (or ``omnitune train``, which starts torchrun itself).
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from omnitune.checkpoint import dcp as ckpt_io
from omnitune.checkpoint.mm_load import is_dcp_release, is_mm_checkpoint, load_mm_weights
from omnitune.config.errors import ConfigError
from omnitune.config.model import check_against_hf_config, load_model_json, unsupported_settings
from omnitune.config.train import TrainArgs, parse_train_args, resolve_loss_type
from omnitune.data.formats import DataError
from omnitune.models.registry import family_for_model_id
from omnitune.train.metrics import Logger
from omnitune.train.model import TrainModel, apply_freeze, load_hf_model
from omnitune.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class Plan:
    """Everything resolved and validated before any process group or model exists."""
    args: TrainArgs
    data_cfg: object
    model_cfg: object
    family: object
    hf_dir: str               # architecture + processor source (original HF folder)
    hf_config: object
    load_kind: str            # "hf" | "mm" | "resume" | "none"
    load_path: str | None
    ignored_flags: list[str] = field(default_factory=list)
    dims: object = None       # parallel.dims.ParallelDims (sizes checked; meshes built in run())
    grad_acc: int = 1
    lora: object = None       # train.lora.LoraSpec, or None (full training)
    lora_base: tuple | None = None   # LoRA: ("hf" | "mm", path) of the base weights
    lora_report: str = ""     # LoRA: the adapter line of --dry-run (set by preflight)
    dpo: object = None        # train.dpo.DpoSpec (data.json attr.ranking), or None (SFT)
    stages: list | None = None  # parallel.pp.StageSpec per pipeline stage (PP > 1)
    stage_report: list[str] = field(default_factory=list)   # --dry-run lines of the stage map
    hetero_report: list[str] = field(default_factory=list)  # --dry-run lines of --hetero-parallel

    def describe(self) -> str:
        a, dims = self.args, self.dims
        gbs = a.global_batch_size or a.micro_batch_size * dims.dp
        frozen = [n for n, m in self.model_cfg.modules().items() if m.freeze]
        lines = [
            f"model      : {self.family.name} ({self.model_cfg.model_id}) from {self.hf_dir}",
            f"load       : {self.load_kind} {self.load_path or ''}".rstrip(),
            f"data       : {a.mm_data} (template {self.data_cfg.dataset_param.basic_parameters.template})",
            *self._describe_data(),
            *dims.describe(),
            *self.hetero_report,
            *self.stage_report,
            *self._describe_memory(),
            f"init       : " + ("meta device; each rank reads only its shards" if a.init_model_with_meta_device
                                else "full model on every rank, then sharded"),
            self._describe_batch(gbs),
            f"schedule   : {a.train_iters} iters, lr {a.lr} -> {a.min_lr} {a.lr_decay_style}, warmup {a.warmup_iters}",
            f"precision  : {'bf16 compute, fp32 master weights' if a.bf16 else 'fp32'}",
            f"frozen     : {', '.join(frozen) or 'none'}",
            *([self.lora_report or f"lora       : {' '.join(self.lora.targets)}, r {self.lora.r}, alpha "
                                    f"{self.lora.alpha}", f"lora base  : {self.lora_base[0]} {self.lora_base[1]}"]
              if self.lora else []),
            *([self.dpo.describe()] if self.dpo else []),
            f"save       : {a.save or '-'} every {a.save_interval or '-'} iters",
        ]
        if self.ignored_flags:
            lines.append("ignored    : " + " ".join("--" + f for f in self.ignored_flags) +
                         " (Megatron kernel/structure flags; structure comes from model.json + config.json)")
        return "\n".join(lines)

    def _describe_batch(self, gbs: int) -> str:
        a, dims = self.args, self.dims
        if a.token_budget is not None:
            return (f"batch      : micro <= {a.token_budget} padded tokens (token budget, grouped by length) x "
                    f"grad-acc {self.grad_acc} x DP {dims.dp} micro-batches per step; seq-length {a.seq_length}")
        unit = " packed rows" if self.data_cfg.dataset_param.basic_parameters.packing else ""
        return (f"batch      : micro {a.micro_batch_size} x grad-acc {self.grad_acc} x DP {dims.dp} = global {gbs}"
                f"{unit}; seq-length {a.seq_length}" + (" tokens per row (packing)" if unit else ""))

    def _describe_memory(self) -> list[str]:
        from omnitune.parallel.estimate import estimate_rank_bytes, format_estimate

        frozen = {n for n, m in self.model_cfg.modules().items() if m.freeze}
        if self.lora is not None:   # base weights frozen everywhere (the adapters are not counted)
            frozen = {g.name for g in self.family.module_groups()}
        est = estimate_rank_bytes(self.family, self.hf_config, self.dims, frozen, bf16=self.args.bf16,
                                  stages=self.stages)
        return format_estimate(est)

    def _describe_data(self) -> list[str]:
        """The data lines of :meth:`describe`: how samples are read, cached, loaded and which media."""
        d = self.data_cfg
        bp, pp, attr = d.dataset_param.basic_parameters, d.dataset_param.preprocess_parameters, d.dataset_param.attr
        dl = d.dataloader_param
        if bp.streaming:
            build = "streaming (read lazily, sharded by data-parallel rank, position saved in checkpoints)"
            if bp.cache_dir:
                build += f"; cache_dir {bp.cache_dir}: " + ("val_dataset only" if bp.val_dataset else "unused")
        else:
            build = (f"map-style, cache_dir {bp.cache_dir}" + (" (overwrite_cache)" if bp.overwrite_cache else "")
                     if bp.cache_dir else "map-style, cache_dir none (preprocessed at every start)")
            n = bp.preprocessing_num_workers or 1
            from omnitune.data.cache import available_cpus

            cpus = available_cpus()
            build += f", preprocessing_num_workers {n}" + (f" (at most {cpus} used: the CPUs available)"
                                                           if n > cpus else "")
        workers = (f"{dl.num_workers} (data.json)" if dl.num_workers is not None
                   else f"{self.args.num_workers} (--num-workers)")
        columns = ", ".join(f"{k}={getattr(attr, k)}" for k in ("images", "videos", "audios") if getattr(attr, k))
        return [
            f"data build : {build}",
            f"dataloader : num_workers {workers}, shuffle {dl.shuffle}, drop_last {dl.drop_last}",
            f"media      : columns {columns or 'none (text only)'}; use_audio_in_video {pp.use_audio_in_video}"
            + ("; preference pairs (attr.ranking)" if attr.ranking else ""),
        ]


def make_plan(argv: list[str], world_size: int | None = None) -> tuple[Plan, bool]:
    """Parse and check everything for a job of ``world_size`` processes (default: $WORLD_SIZE or 1)."""
    from transformers import AutoConfig

    from omnitune.config.data import load_data_config, unsupported_features
    from omnitune.parallel.dims import ParallelDims

    args, ignored, dry_run = parse_train_args(argv)
    if args.lora_target_modules:   # LoRA + TP/CP/EP/meta init: refused before the layout checks
        from omnitune.train.lora import check_layout
        check_layout(args)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_args(args, world)
    dims.check_world()
    grad_acc = dims.check_batch(args.micro_batch_size, args.global_batch_size, args.seq_length)
    data_cfg = load_data_config(args.mm_data)
    problems = unsupported_features(data_cfg)
    if problems:
        raise ConfigError(f"{args.mm_data}: {problems[0]}")
    model_cfg = load_model_json(args.mm_model)
    problems = unsupported_settings(model_cfg)
    if problems:
        raise ConfigError(f"{args.mm_model}: {problems[0]}")
    resolve_loss_type(args, model_cfg, args.mm_model)  # contradicting loss-type settings fail here

    if args.save:
        ckpt_io.check_save_dir(args.save)  # read-only or not a folder: now, not at the first save
    load_kind, load_path = "none", args.load
    if args.load:
        lp = Path(args.load)
        if not lp.exists():
            raise ConfigError(f"--load {args.load}: no such folder")
        if is_mm_checkpoint(lp) or is_dcp_release(lp):  # MindSpeed-MM layouts (mm-convert): weights only
            load_kind = "mm"
            if is_dcp_release(lp):
                ckpt_io.check_checkpoint(ckpt_io.resolve_checkpoint(lp))  # no code from .metadata
        elif ckpt_io.is_training_checkpoint_root(lp):
            load_kind = "resume"
            # fails early if `latest` points nowhere, or a file is unsafe / damaged (no tensor read)
            meta = ckpt_io.check_checkpoint(ckpt_io.resolve_checkpoint(lp))
            meta["_ckpt"] = str(ckpt_io.resolve_checkpoint(lp))
            if not args.no_load_optim and not meta.get("has_optim", False):
                raise ConfigError(f"--load {args.load}: the checkpoint holds no optimizer state (saved with "
                                  f"--no-save-optim); add --no-load-optim to resume with a fresh optimizer")
        elif (lp / "config.json").is_file() and any(lp.glob("*.safetensors")):
            load_kind = "hf"
        else:
            raise ConfigError(f"--load {args.load}: neither an HF folder (config.json + *.safetensors) nor a "
                              f"training checkpoint folder (latest_checkpointed_iteration.txt)")
    hf_dir = (model_cfg.init_from_hf_path
              or data_cfg.dataset_param.preprocess_parameters.model_name_or_path
              or (args.load if load_kind == "hf" else None))
    if not hf_dir or not (Path(hf_dir) / "config.json").is_file():
        raise ConfigError(f"the original HF folder (model.json init_from_hf_path or data.json "
                          f"preprocess_parameters.model_name_or_path) has no config.json: {hf_dir}")
    hf_config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
    family = family_for_folder_and_model_id(hf_config, hf_dir, model_cfg.model_id, args.mm_model)
    from omnitune.data.templates import check_template_fits
    check_template_fits(data_cfg.dataset_param.basic_parameters.template, family.name, args.mm_data, hf_dir)
    check_against_hf_config(model_cfg, family, hf_config, args.mm_model)
    from omnitune.parallel.hetero import plan_hetero
    hetero_report = plan_hetero(args, dims, model_cfg, data_cfg, family, hf_config, args.mm_model)
    dims.check_model(family.parallel_sizes(hf_config))
    bp = data_cfg.dataset_param.basic_parameters
    if args.token_budget is not None:
        clash = ("basic_parameters.packing" if bp.packing else "basic_parameters.streaming" if bp.streaming
                 else "attr.ranking (DPO pairs)" if data_cfg.dataset_param.attr.ranking else None)
        if clash:
            raise ConfigError(f"--token-budget: not with {args.mm_data} {clash} (the budget groups map-style SFT "
                              f"samples by length); remove --token-budget or that setting")
    if bp.packing and dims.cp > 1:
        raise ConfigError(f"{args.mm_data}: basic_parameters.packing with --context-parallel-size {dims.cp} is not "
                          f"implemented (the sequence split would cut packed samples); set packing false or "
                          f"--context-parallel-size 1")
    stages = None
    if dims.pp > 1:
        stages = _plan_pipeline(args, dims, grad_acc, data_cfg, model_cfg, family, hf_config)
    if load_kind == "none":
        # Nothing else given: train from the original HF weights (seed: init_from_hf_path).
        load_kind, load_path = "hf", hf_dir
    plan = Plan(args, data_cfg, model_cfg, family, hf_dir, hf_config, load_kind, load_path, ignored, dims, grad_acc)
    if stages is not None:
        plan.stages, plan.stage_report = stages
    plan.hetero_report = hetero_report
    _plan_lora(plan, meta if load_kind == "resume" else None)
    from omnitune.train.dpo import spec_from
    plan.dpo = spec_from(args, data_cfg, args.mm_data, load_kind=load_kind, load_path=load_path,
                         lora_base=plan.lora_base, resume_state=meta if load_kind == "resume" else None)
    if dry_run:
        preflight(plan)
    return plan, dry_run


def _plan_pipeline(args, dims, grad_acc, data_cfg, model_cfg, family, hf_config):
    """PP > 1: the stage map from model.json and what this version refuses with it; every stage must
    have something to train unless --enable-dummy-optimizer (counted on a meta-device model).
    Returns (stage specs, --dry-run lines)."""
    from omnitune.parallel import pp as ppm
    from omnitune.train.model import build_meta_model

    vpp = args.virtual_pipeline_model_parallel_size or 1
    flag = f"--pipeline-model-parallel-size {dims.pp}"
    bp = data_cfg.dataset_param.basic_parameters
    clash = ("data.json basic_parameters.packing" if bp.packing
             else "data.json attr.ranking (DPO pairs)" if data_cfg.dataset_param.attr.ranking
             else "--token-budget" if args.token_budget is not None
             else "model.json loss_cfg.router_aux_loss_coef" if model_cfg.loss_cfg.router_aux_loss_coef
             else "--init-model-with-meta-device" if args.init_model_with_meta_device
             else "--eval-interval with a validation set (data.json val_dataset / val_rate: validation runs are "
                  "not verified under PP yet)" if args.eval_interval and (bp.val_dataset or bp.val_rate)
             else None)
    if clash:
        raise ConfigError(f"{flag}: not with {clash} in this version; set PP 1 or drop that setting")
    ppm.check_pipeline(args, dims, grad_acc)
    specs = ppm.stage_specs(family, hf_config, model_cfg, dims.pp, vpp, args.mm_model)
    model = build_meta_model(family, hf_config)
    apply_freeze(model, family, {n for n, m in model_cfg.modules().items() if m.freeze})
    counts = ppm.trainable_per_stage(model, family, specs)
    lines = [f"pipeline   : {len(specs)} stages, " + ("1F1B" if vpp == 1 else f"interleaved 1F1B, {vpp} chunks per "
                                                       f"PP rank") + f", {grad_acc} micro-batches per step"]
    lines += [f"  {s.describe(dims.pp)}; {counts[s.index]:,} trainable parameters" for s in specs]
    empty = [s.index for s in specs if counts[s.index] == 0]
    if empty and not args.enable_dummy_optimizer:
        raise ConfigError(f"{args.mm_model}: pipeline stage(s) {', '.join(map(str, empty))} hold no trainable "
                          f"parameter (every module on them is frozen); add --enable-dummy-optimizer, or change "
                          f"the freeze flags / pipeline_num_layers")
    return specs, lines


def _plan_lora(plan: Plan, resume_meta: dict | None) -> None:
    """LoRA: the run's spec and the base weights (``--load-base-model``; else --load when it names
    weights; else, resuming, the base the checkpoint records; else the original HF folder). A LoRA
    checkpoint resumes only with the same LoRA flags; a full checkpoint cannot resume as LoRA."""
    from omnitune.checkpoint.mm_load import is_dcp_release, is_mm_checkpoint
    from omnitune.train.lora import LoraSpec

    a = plan.args
    plan.lora = spec = LoraSpec.from_args(a)
    saved = (resume_meta or {}).get("lora")
    if spec is None:
        if saved:
            raise ConfigError(f"--load {a.load}: {resume_meta['_ckpt']} holds LoRA adapters only; resume it with "
                              f"the flags it was trained with: {LoraSpec.from_json(saved).flags()}")
        return
    base = a.load_base_model
    if resume_meta is not None:
        if not saved:
            raise ConfigError(f"--load {a.load}: a full-training checkpoint cannot resume as LoRA; remove the LoRA "
                              f"flags, or start LoRA from an HF folder with --load-base-model DIR")
        if LoraSpec.from_json(saved) != spec:
            raise ConfigError(f"--load {a.load}: the checkpoint was trained with {LoraSpec.from_json(saved).flags()}; "
                              f"resume with the same LoRA flags")
        base = base or saved["base"]
    elif base and a.load:
        raise ConfigError(f"--load-base-model {base} and --load {a.load} both name the starting weights; keep one")
    else:
        base = base or plan.load_path
    flag = "--load-base-model" if a.load_base_model else "--load"
    bp = Path(base)
    if is_mm_checkpoint(bp) or is_dcp_release(bp):
        plan.lora_base = ("mm", str(bp))
    elif (bp / "config.json").is_file() and any(bp.glob("*.safetensors")):
        plan.lora_base = ("hf", str(bp))
    else:
        raise ConfigError(f"{flag} {base}: the LoRA base must be an HF folder (config.json + *.safetensors) or an "
                          f"mm-convert output")


def preflight(plan: Plan) -> None:
    """The start-up checks of :class:`Trainer` that need the processor or the model's modules, run
    for --dry-run without weights or data: data.json against the processor (template tokens,
    audio rate, use_audio_in_video), model.json's per-module settings on a meta-device model
    (recompute, attention, fused MoE, router aux loss), and "every module frozen". Samples are not
    read here (`omnitune data inspect` builds and decodes them)."""
    from transformers import AutoProcessor

    from omnitune.data.dataset import SampleEncoder
    from omnitune.train.model import build_meta_model

    processor = AutoProcessor.from_pretrained(plan.hf_dir, trust_remote_code=False)
    SampleEncoder(plan.data_cfg, processor)
    model = build_meta_model(plan.family, plan.hf_config)
    frozen = {n for n, m in plan.model_cfg.modules().items() if m.freeze}
    apply_freeze(model, plan.family, frozen)
    if plan.lora is not None:   # adapters on the meta model: the count --dry-run shows
        from omnitune.train import lora

        names = lora.resolve_targets(model, plan.family, plan.lora.targets, frozen)
        plan.lora_report = lora.describe(names, lora.apply_lora(model, plan.lora, names, plan.args.seed), plan.lora)
    if not plan.args.enable_dummy_optimizer and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{plan.args.mm_model}: every module is frozen (freeze: true): nothing to train; "
                          f"unfreeze a module or pass --enable-dummy-optimizer")
    TrainModel(model, plan.family, plan.model_cfg)


def family_for_folder_and_model_id(hf_config, hf_dir, model_id: str, source: str):
    """The family is the HF folder's (its config.json class); model.json's model_id must name it.
    A family may also accept another family's id that MindSpeed-MM's own examples use for it
    (``legacy_model_ids``: its Qwen2.5-Omni model_7b.json says "qwen2_5vl")."""
    from omnitune.models.registry import family_for_hf_config

    named = family_for_model_id(model_id)
    try:
        family = family_for_hf_config(hf_config)
    except ValueError:
        family = None
    if family is not named and (family is None or model_id not in getattr(family, "legacy_model_ids", ())):
        raise ConfigError(f"{source}: model_id {model_id!r} expects a {named.hf_config_class_name} but {hf_dir}/config.json is "
                          f"{type(hf_config).__name__}" + (f" (model_id {family.model_ids[0]!r})" if family else ""))
    return family


def _fmt_layout(lay: dict) -> str:
    return " x ".join(f"{k.upper()}{v}" for k, v in lay.items() if k != "world") + f" ({lay.get('world')} ranks)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    def __init__(self, plan: Plan, dist_ctx):
        from torch.utils.data import DataLoader
        from transformers import AutoProcessor

        from omnitune.data import Collator, MicroBatchSampler, build_datasets
        from omnitune.parallel.parallelize import parallelize

        self.plan, self.d = plan, dist_ctx
        a = self.args = plan.args
        if plan.dims.world != dist_ctx.world_size:
            raise ConfigError(f"the plan was checked for {plan.dims.world} processes but this job has "
                              f"{dist_ctx.world_size}")
        # meshes: built once, every rank (collective)
        self.dims = dims = plan.dims.build(dist_ctx.device.type)
        self.gbs = a.global_batch_size or a.micro_batch_size * dims.dp
        self.grad_acc = dims.check_batch(a.micro_batch_size, a.global_batch_size, a.seq_length)
        seed_everything(a.seed)

        # data: map-style (built once, cached) or streaming (read lazily, position in checkpoints)
        processor = AutoProcessor.from_pretrained(plan.hf_dir, trust_remote_code=False)
        dl = plan.data_cfg.dataloader_param
        self.streaming = plan.data_cfg.dataset_param.basic_parameters.streaming
        self.num_workers = dl.num_workers if dl.num_workers is not None else a.num_workers  # data.json wins
        collate = Collator(processor.tokenizer.pad_token_id,
                           use_audio_in_video=plan.data_cfg.dataset_param.preprocess_parameters.use_audio_in_video,
                           share_pair_media=plan.dpo is not None)
        if self.streaming:
            from omnitune.data.streaming import build_streaming_datasets
            self.dataset, self.val_dataset = build_streaming_datasets(
                plan.data_cfg, processor, a.seq_length, micro_batch_size=a.micro_batch_size, collate_fn=collate,
                dp_rank=dims.dp_rank, dp_size=dims.dp, num_workers=self.num_workers, seed=a.seed,
                pack_capacity=a.seq_length if plan.data_cfg.dataset_param.basic_parameters.packing else None)
        else:
            self.dataset, self.val_dataset = build_datasets(plan.data_cfg, processor, a.seq_length, seed=a.seed)
            if plan.data_cfg.dataset_param.basic_parameters.packing:   # rows of several samples
                from omnitune.data.packing import PackedDataset
                self.dataset = PackedDataset(self.dataset, a.seq_length)
                self.log(self.dataset.describe())
        self._loader_args = dict(num_workers=self.num_workers,
                                 pin_memory=dl.pin_memory and dist_ctx.device.type != "cpu")
        self._make_loader = lambda sampler, ds=None: DataLoader(ds if ds is not None else self.dataset,
                                                                batch_sampler=sampler, collate_fn=collate,
                                                                **self._loader_args)

        # model: the full model on every rank, or (--init-model-with-meta-device) on the meta device,
        # materialised shard by shard after the parallel plans
        meta = a.init_model_with_meta_device
        init = plan.load_kind == "hf" and not meta
        frozen = {n for n, m in plan.model_cfg.modules().items() if m.freeze}
        self.lora_modules: list[str] = []
        if plan.lora is not None:   # base weights (frozen) + seeded adapters; resume loads the adapters below
            from omnitune.train import lora
            hf, self.lora_modules, n_adapter = lora.load_base_with_adapters(plan, frozen)
            self.log(lora.describe(self.lora_modules, n_adapter, plan.lora))
        elif meta:
            from omnitune.train.model import build_meta_model
            hf = build_meta_model(plan.family, plan.hf_config)
        else:
            hf = load_hf_model(plan.family, plan.load_path if init else None, plan.hf_config, init_weights=init)
            if plan.load_kind == "mm":
                load_mm_weights(plan.load_path, plan.family, hf)
        self.trainable = apply_freeze(hf, plan.family, frozen)
        if not meta:
            hf.to(dist_ctx.device)
        self.pp_runner = None
        if plan.stages is not None:   # this rank's pipeline stages (parallel/pp.py): pruned copies, then
            self._build_pipeline(hf, processor.tokenizer.pad_token_id)   # the model.json settings on each
        else:
            self.model = TrainModel(hf, plan.family, plan.model_cfg)
        if plan.data_cfg.dataset_param.basic_parameters.packing:   # per-sample attention (ops/packing.py)
            from omnitune.ops.packing import use_packed_attention
            impl = use_packed_attention(hf, plan.family)
            self.log(f"module     : text_decoder: attn {impl or plan.family.language_model(hf).config._attn_implementation}"
                     f" on packed rows")
        self.loss_type = resolve_loss_type(a, plan.model_cfg, a.mm_model)
        lc = plan.model_cfg.loss_cfg
        self.log(f"loss       : {self.loss_type}, logits {lc.compute_mode}"
                 + (f" (chunk {lc.chunk_size})" if lc.compute_mode != "default" else "")
                 + (f", router aux x {lc.router_aux_loss_coef}" if lc.router_aux_loss_coef else ""))
        for name, what in self.model.settings_report.items():
            self.log(f"module     : {name}: " + ", ".join(f"{k} {v}" for k, v in what.items()))
        if plan.stages is None:   # (pipeline stages were sharded each alone)
            parallelize(self.model, plan.family, dims, a.bf16)
            if dims.hetero_dp:
                from omnitune.parallel.hetero import describe_towers
                for line in describe_towers(self.model.hf, plan.family, dims):
                    self.log(line)
        if meta:
            from omnitune.checkpoint.sharded_load import materialize_and_load
            # resume: materialise only; load_checkpoint below fills every shard from the DCP files
            kind = plan.load_kind if plan.load_kind in ("hf", "mm") else None
            report = materialize_and_load(self.model, plan.family, kind, plan.load_path, device=dist_ctx.device)
            self.log(report.describe())
        if self.pp_runner is not None:   # one AdamW per stage model (None: a stage with nothing to train)
            from omnitune.train.optim import OptimizerList
            self.optimizer = OptimizerList([build_optimizer(st, a.lr, a.weight_decay, (a.adam_beta1, a.adam_beta2),
                                                            a.adam_eps, allow_empty=True) for st in self.model.parts])
        else:
            self.optimizer = build_optimizer(self.model, a.lr, a.weight_decay, (a.adam_beta1, a.adam_beta2),
                                             a.adam_eps, allow_empty=a.enable_dummy_optimizer)
        self.reference = self.ref_model = None
        if plan.dpo is not None:   # never trained; sharded like the policy, or the policy without adapters
            from omnitune.train.dpo import build_reference
            self.reference, self.ref_model = build_reference(plan, dims, dist_ctx.device, self.model)
        self.iteration = 0
        self.consumed = 0
        if plan.load_kind == "resume":
            ckpt = ckpt_io.resolve_checkpoint(plan.load_path)
            meta = ckpt_io.load_checkpoint(ckpt, self.model.hf, self.optimizer,
                                           load_optim=not a.no_load_optim, load_rng=not a.no_load_rng,
                                           layout=self._layout(), key_filter=self._ckpt_keys())
            self._resume_state = meta
            self.iteration = int(meta.get("iteration", 0))
            self.consumed = int(meta.get("consumed_samples", 0))
            if self.streaming:
                try:
                    data_state = ckpt_io.read_data_state(ckpt, rank=dims.dp_rank)
                except FileNotFoundError as e:
                    raise ConfigError(f"--load {plan.load_path}: {e}") from None
                if data_state is None:
                    raise ConfigError(f"--load {plan.load_path}: {ckpt} holds no streaming data position (saved "
                                      f"by a run without streaming); resume it without streaming: true")
                self.dataset.load_state_dict(data_state, source=str(ckpt))
            saved = meta.get("layout")
            self.log(f"resumed from {ckpt} at iteration {self.iteration} ({self.consumed} samples consumed)"
                     + ("" if saved is None or saved == self._layout() else
                        f"; saved at layout {_fmt_layout(saved)}, resharded to {_fmt_layout(self._layout())}"
                        + ("" if a.no_load_rng else " (RNG not restored: it is per rank of a layout)")))
        if self.streaming:
            self.sampler = None
        elif a.token_budget is not None:   # dynamic micro-batches; the position is the step count
            from omnitune.data.budget import TokenBudgetSampler
            from omnitune.data.packing import sample_lengths
            self.sampler = TokenBudgetSampler(sample_lengths(self.dataset), a.token_budget, self.grad_acc,
                                              dims.dp_rank, dims.dp, shuffle=dl.shuffle, seed=a.seed,
                                              consumed_steps=self.iteration)
            if plan.load_kind == "resume":
                saved = self._resume_state.get("sampler")
                if saved is None:
                    raise ConfigError(f"--load {plan.load_path}: saved without --token-budget; resume without it")
                try:
                    self.sampler.load_state_dict(dict(saved, consumed_steps=self.iteration))
                except ValueError as e:
                    raise ConfigError(f"--load {plan.load_path}: {e}") from None
        else:
            try:
                self.sampler = MicroBatchSampler(
                    len(self.dataset), a.micro_batch_size, self.gbs, dims.dp_rank, dims.dp,
                    shuffle=dl.shuffle, seed=a.seed, drop_last=dl.drop_last,
                    consumed_samples=self.consumed)
            except ValueError as e:
                what = (f"{a.mm_data}: packed into {len(self.dataset)} rows of <= {a.seq_length} tokens, which "
                        f"count as the samples of a batch; " if hasattr(self.dataset, "rows") else f"{a.mm_data}: ")
                raise DataError(what + str(e)) from None
        self.logger = self._make_logger()

    def _build_pipeline(self, hf, pad_id) -> None:
        from omnitune.parallel import pp as ppm
        from omnitune.parallel.parallelize import parallelize

        plan, dims, a = self.plan, self.dims, self.args
        table = ppm.StepTable()
        stages = ppm.build_stage_modules(hf, plan.family, plan.model_cfg, plan.stages, dims.coords(dims.rank)["pp"],
                                         dims.pp, table)
        for st in stages:
            parallelize(st, plan.family, dims, a.bf16)
        self.model = ppm.StagesModel(stages)
        self.pp_runner = ppm.PipelineRunner(stages, len(plan.stages), dims, self.d.device,
                                            a.virtual_pipeline_model_parallel_size or 1)
        self.tied_sync = ppm.TiedGradSync(dims, stages)
        self.pp_tied_copy = {id(p) for st in stages if st.spec.last and not st.spec.first
                             for p in ppm.tied_stage_parameters([st])}
        self.pad_id = pad_id
        for line in plan.stage_report:
            self.log(line)

    def _make_logger(self) -> Logger:
        """Megatron lines + metrics.jsonl, and the progress bar / TensorBoard / W&B the flags ask for."""
        a = self.args
        metrics_file = Path(a.save) / "metrics.jsonl" if a.save else None
        tb_dir = a.tensorboard_dir or (str(Path(a.save) / "tensorboard") if a.save else None)
        return Logger(self.d.is_main, a.train_iters, log_tps=a.log_tps, metrics_file=metrics_file,
                      start_iteration=self.iteration, progress_bar=not a.no_progress_bar, tensorboard_dir=tb_dir,
                      wandb_project=a.wandb_project, wandb_name=a.wandb_exp_name,
                      run_config=a.model_dump() if a.wandb_project else None)

    def _ckpt_keys(self):
        """LoRA: checkpoints hold the adapter tensors only (the base is re-read from its folder)."""
        if self.plan.lora is None:
            return None
        from omnitune.train.lora import is_adapter_key
        return is_adapter_key

    def _layout(self) -> dict:
        d = self.dims
        return {"world": d.world, "tp": d.tp, "cp": d.cp, "ep": d.ep, "pp": d.pp}

    def log(self, msg: str) -> None:
        if self.d.is_main:
            logger = getattr(self, "logger", None)
            if logger is not None:   # above the progress bar
                logger.write(msg)
            else:
                print(msg, flush=True)

    # --------------------------------------------------------------------------------- step
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches.

        The loss of the step is ``sum_i w_i * l_i`` over every trained token of the global batch
        (train.loss: the weights encode default / per_sample_loss / per_token_loss). Global counts
        are taken from the labels before any forward (one all-reduce), so each micro-batch's
        backward already carries its final weight.

        Ranks: the DP ranks hold different samples; the CP ranks of one DP rank hold the same
        samples and each computes the loss of its part of the sequence; TP ranks compute the same
        loss. FSDP2 averages gradients over DP x CP, so each rank backpropagates ``dp_cp x`` its
        part; counts are summed over DP only. The router aux term is a mean over micro-batches and
        DP x CP ranks (under CP: the mean of the sequence chunks' load-balancing losses, which is
        close to but not exactly the whole sequence's: that loss is not additive over tokens)."""
        if getattr(getattr(self, "plan", None), "dpo", None) is not None:   # (tests build bare Trainers)
            return self.dpo_step(micro_batches)
        if getattr(self, "pp_runner", None) is not None:
            return self.pipeline_step(micro_batches)
        from omnitune.train.loss import local_counts, token_weights

        a, dev, dims = self.args, self.d.device, self.dims
        model, scale = self.model, dims.dp_cp
        counts = local_counts([mb["labels"] for mb in micro_batches],
                              [mb.get("segment_ids") for mb in micro_batches]).to(dev)
        if self.loss_type != "default" and dims.dp > 1:
            dist.all_reduce(counts, group=dims.group("dp"))
        n_micro = len(micro_batches) * dims.dp
        local_loss = torch.zeros((), dtype=torch.float64, device=dev)
        local_aux = torch.zeros((), dtype=torch.float64, device=dev)
        local_tokens = torch.zeros((), dtype=torch.float64, device=dev)
        for i, mb in enumerate(micro_batches):
            mb = dict(mb)
            mb["loss_weights"] = token_weights(mb["labels"], self.loss_type, micro_batches=n_micro,
                                               global_tokens=float(counts[0]), global_samples=float(counts[1]),
                                               segments=mb.get("segment_ids"))
            mb = _to_device(mb, dev)
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                loss_part, _, aux = model(mb)
            (loss_part * scale + aux / len(micro_batches)).backward()
            local_loss += loss_part.detach().double()
            local_aux += aux.detach().double() / (n_micro * dims.cp)
            local_tokens += float(mb["attention_mask"].sum()) / dims.cp
        grad_norm = self._clip_grad()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        stats = torch.stack([local_loss, local_aux, local_tokens])
        if dims.dp_cp > 1:   # TP ranks hold the same values: sum over DP x CP only
            dist.all_reduce(stats, group=dims.group("dp_cp"))
        out = {"loss": stats[0].item() + stats[1].item(), "tokens": stats[2].item(), "grad_norm": grad_norm}
        if self.model.router_aux_coef:
            out["aux_loss"] = stats[1].item()
        return out

    def pipeline_step(self, micro_batches: list[dict]) -> dict:
        """:meth:`train_step` under pipeline parallelism: the same loss weights, computed up front on
        every stage (all ranks of a pipeline hold the same micro-batches); the schedule runs forward
        and backward of all micro-batches; the last stage holds the loss, summed over PP then DP x CP
        for the log."""
        from omnitune.parallel.pp import pad_micro_batches
        from omnitune.train.loss import local_counts, token_weights

        a, dev, dims = self.args, self.d.device, self.dims
        counts = local_counts([mb["labels"] for mb in micro_batches],
                              [mb.get("segment_ids") for mb in micro_batches]).to(dev)
        if self.loss_type != "default" and dims.dp > 1:
            dist.all_reduce(counts, group=dims.group("dp"))
        n_micro = len(micro_batches) * dims.dp
        mbs = []
        for mb in micro_batches:
            mb = dict(mb)
            mb["loss_weights"] = token_weights(mb["labels"], self.loss_type, micro_batches=n_micro,
                                               global_tokens=float(counts[0]), global_samples=float(counts[1]),
                                               segments=mb.get("segment_ids"))
            mbs.append(_to_device(mb, dev))
        mbs = pad_micro_batches(mbs, self.pad_id, group=dims.group("dp") if dims.dp > 1 else None)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            parts = self.pp_runner.step(mbs, scale=float(dims.dp_cp))
        self.tied_sync()
        grad_norm = self._clip_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        last = self.pp_runner.is_last
        loss = sum((v.double() for v in parts.values()), torch.zeros((), dtype=torch.float64, device=dev))
        tokens = sum(float(mb["attention_mask"].sum()) for mb in micro_batches) if last else 0.0
        stats = torch.stack([loss.to(dev), torch.tensor(float(tokens), dtype=torch.float64, device=dev)])
        dist.all_reduce(stats, group=dims.group("pp"))
        if dims.dp_cp > 1:
            dist.all_reduce(stats, group=dims.group("dp_cp"))
        return {"loss": stats[0].item(), "tokens": stats[1].item(), "grad_norm": grad_norm}

    def dpo_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step of DPO (train/dpo.py): the mean pair loss over the global batch. Each
        micro-batch's pairs get weight 1 / (pairs in the global batch, counted over DP up front), so
        the step is the same for any micro x grad-acc x DP split; FSDP2's average over the DP ranks
        is undone by the ``dp`` factor as in :meth:`train_step`. The reference runs first, under
        no_grad, on the same batch."""
        from omnitune.train.dpo import pair_losses

        a, dev, dims, spec = self.args, self.d.device, self.dims, self.plan.dpo
        model, scale = self.model, dims.dp_cp
        pairs = torch.tensor(float(sum(mb["input_ids"].shape[0] // 2 for mb in micro_batches)),
                             dtype=torch.float64, device=dev)
        if dims.dp > 1:
            dist.all_reduce(pairs, group=dims.group("dp"))
        # loss, aux, tokens, chosen rewards, rejected rewards, margin, accuracy (sums over pairs)
        acc = torch.zeros(7, dtype=torch.float64, device=dev)
        for i, mb in enumerate(micro_batches):
            mb = _to_device(mb, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                ref_logp, _ = self.reference(mb)
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                logp, n, aux = model(mb, per_row=True)
            out = pair_losses(spec, logp, ref_logp, n)
            part = out["loss"].sum() / pairs
            (part * scale + aux / len(micro_batches)).backward()
            c, r = out["chosen_rewards"].double(), out["rejected_rewards"].double()
            acc += torch.stack([part.detach().double() * pairs, aux.detach().double() / (len(micro_batches) * dims.dp),
                                torch.tensor(float(mb["attention_mask"].sum()), dtype=torch.float64, device=dev),
                                c.sum(), r.sum(), (c - r).sum(), (c > r).double().sum()])
        grad_norm = self._clip_grad()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if dims.dp > 1:   # TP ranks hold the same values
            dist.all_reduce(acc, group=dims.group("dp"))
        p = float(pairs)
        out = {"loss": acc[0].item() / p + acc[1].item(), "tokens": acc[2].item(), "grad_norm": grad_norm,
               "extra": {"rewards/chosen": acc[3].item() / p, "rewards/rejected": acc[4].item() / p,
                         "rewards/margin": acc[5].item() / p, "rewards/accuracy": acc[6].item() / p}}
        if self.model.router_aux_coef:
            out["aux_loss"] = acc[1].item()
        return out

    def _clip_grad(self) -> float:
        """Global gradient norm over every parameter, whichever mesh it lives on (TP 2-D, FSDP
        1-D, experts on the EP mesh); gradients scaled to --clip-grad (0: not clipped)."""
        from omnitune.parallel.grad import clip_grad_norm_

        max_norm = self.args.clip_grad if self.args.clip_grad > 0 else float("inf")
        if getattr(self, "pp_runner", None) is not None:   # every stage's part, the tied copy once
            from omnitune.parallel.grad import total_norm
            params = [p for p in self.model.parameters() if p.grad is not None]
            sq = torch.tensor(total_norm([p for p in params if id(p) not in self.pp_tied_copy]) ** 2,
                              dtype=torch.float64, device=self.d.device)
            dist.all_reduce(sq, group=self.dims.group("pp"))
            norm = math.sqrt(float(sq))
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                with torch.no_grad():
                    for p in params:
                        p.grad.mul_(coef)
            return norm
        return clip_grad_norm_(self.model.parameters(), max_norm)

    # --------------------------------------------------------------------------------- loop
    def fit(self) -> list[float]:
        a = self.args
        stop_at = a.train_iters
        if a.exit_interval:
            stop_at = min(stop_at, (self.iteration // a.exit_interval + 1) * a.exit_interval)
        try:
            losses = self._fit_loop(stop_at)
        finally:
            self.logger.close()
        return losses

    def _fit_loop(self, stop_at: int) -> list[float]:
        from omnitune.train.report import peak_memory_per_rank

        a = self.args
        loader_iter = iter(self._train_loader())
        losses = []
        self.model.train()
        while self.iteration < stop_at:
            lr = lr_at(self.iteration, lr=a.lr, min_lr=a.min_lr, warmup=a.warmup_iters,
                       total=a.train_iters, style=a.lr_decay_style)
            set_lr(self.optimizer, lr)
            t0 = time.perf_counter()
            micro = [self._next_micro_batch(loader_iter) for _ in range(self.grad_acc)]
            stats = self.train_step(micro)
            if self.d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step_samples = self._step_samples()
            self.iteration += 1
            self.consumed += step_samples
            losses.append(stats["loss"])
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"loss is {stats['loss']} at iteration {self.iteration}")
            self.logger.step(self.iteration, self.consumed, dt, lr, step_samples, stats,
                             show=self.iteration % a.log_interval == 0)
            if a.eval_interval and self.iteration % a.eval_interval == 0:
                self.evaluate()
            if a.save and a.save_interval and self.iteration % a.save_interval == 0:
                self.save()
        if a.save and (not a.save_interval or self.iteration % a.save_interval != 0):
            self.save()
        self.logger.finish(self.iteration, peak_memory_per_rank(self.d.device))
        return losses

    def _step_samples(self) -> int:
        """Samples of the step being taken (--token-budget: it varies; else the global batch)."""
        if getattr(self.args, "token_budget", None) is not None:
            return self.sampler.samples_in_step(self.iteration)
        return self.gbs

    def _train_loader(self):
        from torch.utils.data import DataLoader

        if self.streaming:  # the dataset yields collated micro-batches of this rank
            return DataLoader(self.dataset, batch_size=None, **self._loader_args)
        return self._make_loader(self.sampler)

    def _next_micro_batch(self, loader_iter) -> dict:
        """The next training micro-batch; a streaming batch's position is recorded as consumed."""
        try:
            mb = next(loader_iter)
        except DataError as e:  # raised in a DataLoader worker: drop the worker's traceback text
            msg = str(e)
            if msg.startswith("Caught DataError") and "DataError: " in msg:
                msg = msg.rsplit("DataError: ", 1)[1].strip()
            raise DataError(msg) from None
        state = mb.pop("stream_state", None)
        if state is not None:
            self.dataset.advance(state)
        return mb

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation loss: --eval-iters global batches of the validation set (cycled; rank r takes
        every world-th micro-batch), token mean over all of them. No-op without a validation set."""
        a, dev = self.args, self.d.device
        if self.val_dataset is None or a.eval_iters <= 0:
            return None
        dims = self.dims
        n, world, mbs = len(self.val_dataset), dims.dp, a.micro_batch_size
        batches = [[((k * world + dims.dp_rank) * mbs + j) % n for j in range(mbs)]
                   for k in range(a.eval_iters * self.grad_acc)]
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=dev)
        if getattr(self, "pp_runner", None) is not None:   # forward-only schedule; the last stage sums
            from omnitune.parallel.pp import pad_micro_batches
            mbs = pad_micro_batches([_to_device(mb, dev) for mb in self._make_loader(batches, self.val_dataset)],
                                    self.pad_id)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                parts = self.pp_runner.step(mbs, scale=1.0, train=False)
            counts = self.pp_runner.table.counts
            for i, v in parts.items():
                totals += torch.stack([v.double(), counts[i].double().to(dev)])
            dist.all_reduce(totals, group=dims.group("pp"))
            batches = []
        for mb in self._make_loader(batches, self.val_dataset) if batches else ():
            mb = _to_device(mb, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                if self.plan.dpo is not None:   # the DPO loss, mean over the validation pairs
                    from omnitune.train.dpo import pair_losses
                    ref_logp, _ = self.reference(mb)
                    logp, n, _ = self.model(mb, per_row=True)
                    loss = pair_losses(self.plan.dpo, logp, ref_logp, n)["loss"]
                    loss_sum, count = loss.sum(), torch.tensor(loss.numel(), device=dev)
                else:
                    loss_sum, count, _ = self.model(mb)
            totals += torch.stack([loss_sum.double(), count.double()])
        self.model.train()
        if dims.dp_cp > 1:   # CP ranks: loss and count of their own tokens
            dist.all_reduce(totals, group=dims.group("dp_cp"))
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        self.logger.eval(self.iteration, loss)
        return loss

    def _writes_data_state(self) -> bool:
        """Streaming: the first rank of each data-parallel rank's TP x CP group writes its position."""
        return self.streaming and self.dims.cp_rank == 0 and self.dims.tp_rank == 0

    def save(self) -> None:
        a = self.args
        state = {"consumed_samples": self.consumed, "train_iters": a.train_iters,
                 "global_batch_size": self.gbs, "seed": a.seed, "model_id": self.plan.model_cfg.model_id,
                 "hf_dir": str(Path(self.plan.hf_dir).resolve()),
                 "scheduler": {"lr": a.lr, "min_lr": a.min_lr, "warmup_iters": a.warmup_iters,
                               "decay_style": a.lr_decay_style, "num_steps": self.iteration}}
        if self.plan.dpo is not None:
            state["dpo"] = self.plan.dpo.to_json()
        if self.args.token_budget is not None:
            state["sampler"] = self.sampler.state_dict()
        if self.plan.lora is not None:
            kind, base = self.plan.lora_base
            state["lora"] = dict(self.plan.lora.to_json(), base=str(Path(base).resolve()), base_kind=kind,
                                 modules=self.lora_modules)
        path = ckpt_io.save_checkpoint(a.save, self.iteration, self.model.hf, self.optimizer, state,
                                       save_optim=not a.no_save_optim, save_rng=not a.no_save_rng,
                                       data_state=self.dataset.state_dict() if self._writes_data_state() else None,
                                       data_rank=self.dims.dp_rank, layout=self._layout(),
                                       key_filter=self._ckpt_keys())
        self.log(f"saved checkpoint {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        plan, dry_run = make_plan(argv)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(plan.describe())
        return 0
    return run(plan)


def _print_error(message: str) -> None:
    print(f"omnitune: error: {message}", file=sys.stderr)


def run(plan: Plan, report=_print_error) -> int:
    """Train a checked plan in this process (one rank of a torchrun job, or a one-rank group).
    ``report`` prints a ConfigError / DataError (`python -m omnitune.train`: after torchrun's report)."""
    from omnitune.parallel.mesh import init_distributed, shutdown

    d = init_distributed(plan.args.distributed_timeout_minutes)
    ok = False
    try:
        if d.is_main:
            print(plan.describe(), flush=True)
        trainer = Trainer(plan, d)
        trainer.fit()
        ok = True
    except (ConfigError, DataError) as e:
        report(str(e))
        return 2
    finally:
        shutdown(wait=ok)
    return 0
