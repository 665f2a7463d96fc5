"""Megatron-style training flags (SPEC section 7), parsed into a pydantic model.

Three kinds of flags:
- implemented: fields of :class:`TrainArgs` (``--micro-batch-size`` -> ``micro_batch_size``);
- accepted and ignored: flags of the seed scripts that steer Megatron internals or describe model
  structure (structure comes from model.json / config.json, as the seed guides say);
- not implemented yet: parsed so the error can name them, then refused at start.
Anything else is an unknown flag and fails with its name.
"""
from __future__ import annotations

import argparse
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from omnitune.config.errors import ConfigError, format_validation_error


class TrainArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # data / model configs
    mm_data: str
    mm_model: str
    # batch and sequence
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    seq_length: int = 1024
    # optimizer and schedule
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    train_iters: int
    exit_interval: int | None = None
    seed: int = 1234
    bf16: bool = False
    # parallel sizes (parallel/dims.py resolves and checks them; pipeline parallel not implemented yet)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    #: any string parses; parallel/dims.py refuses what is not implemented, naming the flag
    context_parallel_algo: str = "ulysses_cp_algo"
    expert_model_parallel_size: int = 1
    # checkpoints
    load: str | None = None
    save: str | None = None
    save_interval: int | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    # logging and eval
    log_interval: int = 1
    log_tps: bool = False
    eval_interval: int | None = None
    eval_iters: int = 0
    # progress, dashboards and plots (train/report.py)
    #: no tqdm progress bar (it is shown on rank 0 only when stderr is a terminal)
    no_progress_bar: bool = False
    #: TensorBoard event files go here (default: <--save>/tensorboard; none without --save)
    tensorboard_dir: str | None = None
    #: log the scalars to this Weights & Biases project (when wandb is installed; skipped otherwise)
    wandb_project: str | None = None
    #: the Weights & Biases run name (default: wandb's)
    wandb_exp_name: str | None = None
    # misc
    num_workers: int = 0
    distributed_timeout_minutes: int = 10
    enable_dummy_optimizer: bool = False
    use_torch_fsdp2: bool = True
    #: build the model on the meta device, apply the parallel plans, then each rank materialises and
    #: reads only its own shards (checkpoint/sharded_load.py)
    init_model_with_meta_device: bool = False
    # loss type (SPEC section 7); also model.json loss_cfg.loss_type
    calculate_per_sample_loss: bool = False
    calculate_per_token_loss: bool = False

    @model_validator(mode="after")
    def _check(self):
        for name in ("micro_batch_size", "seq_length", "train_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < self.micro_batch_size:
            raise ValueError("--global-batch-size must be >= --micro-batch-size")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction <= 1:
            raise ValueError("--lr-warmup-fraction must be in [0, 1]")
        if self.min_lr > self.lr:
            raise ValueError("--min-lr must be <= --lr")
        if self.calculate_per_sample_loss and self.calculate_per_token_loss:
            raise ValueError("--calculate-per-sample-loss and --calculate-per-token-loss exclude each other; "
                             "give one")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save")
        return self

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * self.train_iters)
        return self.lr_warmup_iters


# Flags of the seed scripts with no effect here: Megatron kernel switches and model-structure flags
# (structure comes from model.json + config.json). value: whether the flag takes an argument.
IGNORED_FLAGS: dict[str, bool] = {
    "use-mcore-models": False, "tokenizer-type": True, "vocab-size": True,
    "make-vocab-size-divisible-by": True, "normalization": True, "use-fused-rmsnorm": False,
    "swiglu": False, "use-fused-swiglu": False, "no-masked-softmax-fusion": False,
    "no-gradient-accumulation-fusion": False, "use-distributed-optimizer": False,
    "use-flash-attn": False, "variable-seq-lengths": False, "reuse-fp32-param": False,
    "ckpt-format": True, "mm-tool": True, "distributed-backend": True, "sequence-parallel": False,
    "use-fused-rotary-pos-emb": False, "position-embedding-type": True, "num-layers": True,
    "hidden-size": True, "ffn-hidden-size": True, "num-attention-heads": True,
    "max-position-embeddings": True, "group-query-attention": False, "num-query-groups": True,
    "untie-embeddings-and-output-weights": False, "disable-bias-linear": False,
    "add-qkv-bias": False, "rotary-base": True, "attention-softmax-in-fp32": False,
    "no-rope-fusion": False, "use-flash-attention": False, "init-method-std": True,
    "fsdp2-config-path": True, "optimizer-selection": True, "use-cpu-initialization": False,
}

# Flags a later version implements; refused now with their name.
NOT_YET: dict[str, bool] = {
    "lora-target-modules": True, "lora-r": True, "lora-alpha": True, "lora-dropout": True,
    "load-base-model": True, "dpo-beta": True, "dpo-loss-type": True, "dpo-label-smoothing": True,
    "pref-ftx": True, "ref-model": True, "hetero-parallel": False,
    "fp16": False,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit(2); we raise so callers can report uniformly
        raise ConfigError(message.replace("unrecognized arguments", "unknown flag(s)"))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="omnitune.train", allow_abbrev=False,
                description="Fine-tune a Qwen multimodal model (MindSpeed-MM compatible flags).")
    for name, field in TrainArgs.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        if ann is bool:
            p.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=name, default=argparse.SUPPRESS)
    for prefix, table in (("ignored__", IGNORED_FLAGS), ("notyet__", NOT_YET)):
        for flag, takes in table.items():
            p.add_argument("--" + flag, dest=prefix + flag, action="store" if takes else "store_true",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", dest="dry_run__", action="store_true", default=False,
                   help="validate configs, print the plan, do not train")
    return p


def parse_train_args(argv: list[str]) -> tuple[TrainArgs, list[str], bool]:
    """Return (args, ignored flag names, dry_run). Raises ConfigError naming the bad flag."""
    ns = vars(build_parser().parse_args(argv))
    dry_run = ns.pop("dry_run__")
    ignored = sorted(k.split("__", 1)[1] for k in ns if k.startswith("ignored__"))
    notyet = sorted(k.split("__", 1)[1] for k in ns if k.startswith("notyet__"))
    if notyet:
        raise ConfigError(f"--{notyet[0]} is not implemented in this version of omnitune "
                          f"(remove the flag; planned: LoRA, DPO, hetero parallel)")
    values = {k: v for k, v in ns.items() if "__" not in k}
    for name in ("mm_data", "mm_model", "train_iters"):
        if name not in values:
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    try:
        args = TrainArgs.model_validate(values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "flags")) from None
    if args.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError("--virtual-pipeline-model-parallel-size is not implemented in this version")
    return args, ignored, dry_run


def resolve_loss_type(args: TrainArgs, model_cfg, source: str = "model.json") -> str:
    """The loss type from --calculate-per-*-loss or model.json loss_cfg.loss_type; both given and
    different is an error."""
    flag = ("per_sample_loss" if args.calculate_per_sample_loss else
            "per_token_loss" if args.calculate_per_token_loss else None)
    cfg = model_cfg.loss_cfg.loss_type
    if flag and cfg != "default" and cfg != flag:
        raise ConfigError(f"{source}: loss_cfg.loss_type {cfg!r} contradicts --calculate-"
                          f"{flag[:-len('_loss')].replace('_', '-')}-loss; keep one of them")
    return flag or cfg
