"""Megatron-style training flags, parsed into a pydantic model (docs/reference.md lists them).

Three kinds of flags:
- implemented: fields of :class:`TrainArgs` (``--micro-batch-size`` -> ``micro_batch_size``); each
  field carries its one-line description, its help group and its range, so ``omnitune train
  --help``, docs/reference.md and the checks cannot drift apart;
- accepted and ignored: flags of the seed scripts that steer Megatron internals or describe model
  structure (structure comes from model.json / config.json, as the seed guides say);
- not implemented yet: parsed so the error can name them, then refused at start.
Anything else is an unknown flag and fails with its name.
"""
from __future__ import annotations

import argparse
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnitune.config.errors import REFERENCE, ConfigError, flag_of, format_validation_error

HELP_HINT = f"see omnitune train --help or {REFERENCE}"


def _f(default, group: str, description: str, **limits):
    """A TrainArgs field: its default, help group, one-line description and range (ge/gt/le/lt)."""
    return Field(default, description=description, json_schema_extra={"group": group}, **limits)


# help groups, in the order `omnitune train --help` shows them
GROUPS = ("data", "batch", "schedule/optimizer", "parallel", "checkpoint", "LoRA", "DPO", "logging", "misc")
DPO_FIELDS = ("dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "pref_ftx", "ref_model")


class TrainArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # data / model configs
    mm_data: str = _f(..., "data", "data.json: datasets, template, preprocessing, dataloader (required)")
    mm_model: str = _f(..., "data", "model.json: model_id, frozen modules, per-module settings (required)")
    num_workers: int = _f(0, "data", "DataLoader worker processes (data.json dataloader_param.num_workers wins)", ge=0)
    # batch and sequence
    micro_batch_size: int = _f(1, "batch", "samples per forward/backward on each data-parallel rank", ge=1)
    global_batch_size: int | None = _f(None, "batch", "samples per optimizer step = micro x grad-acc x DP "
                                                      "(default: micro x DP, no accumulation)", ge=1)
    seq_length: int = _f(1024, "batch", "max tokens per sample (the limit is min(this, data.json cutoff_len)); "
                                        "with data.json packing: tokens per packed row", ge=1)
    token_budget: int | None = _f(None, "batch", "dynamic micro-batches: at most N padded tokens each (samples x "
                                                 "longest), grouped by length; a step is still grad-acc x DP "
                                                 "micro-batches (from the flags above), its sample count varies "
                                                 "(map-style data, not with packing)", ge=1)
    # optimizer and schedule
    train_iters: int = _f(..., "schedule/optimizer", "optimizer steps to train (required)", ge=1)
    lr: float = _f(1e-5, "schedule/optimizer", "peak learning rate (AdamW)", ge=0)
    min_lr: float = _f(0.0, "schedule/optimizer", "learning rate at the end of the decay", ge=0)
    lr_decay_style: Literal["cosine", "linear", "constant"] = _f(
        "cosine", "schedule/optimizer", "decay after warmup: cosine, linear or constant")
    lr_warmup_fraction: float | None = _f(None, "schedule/optimizer", "warmup as a fraction of --train-iters "
                                                                      "(overrides --lr-warmup-iters)", ge=0, le=1)
    lr_warmup_iters: int = _f(0, "schedule/optimizer", "linear warmup steps from 0 to --lr", ge=0)
    weight_decay: float = _f(0.0, "schedule/optimizer", "AdamW decoupled weight decay", ge=0)
    clip_grad: float = _f(1.0, "schedule/optimizer", "global gradient-norm clip (0: no clipping)", ge=0)
    adam_beta1: float = _f(0.9, "schedule/optimizer", "AdamW beta1, in [0, 1)", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "schedule/optimizer", "AdamW beta2, in [0, 1)", ge=0, lt=1)
    adam_eps: float = _f(1e-8, "schedule/optimizer", "AdamW epsilon (> 0)", gt=0)
    exit_interval: int | None = _f(None, "schedule/optimizer", "stop at the next multiple of N steps (then resume "
                                                               "with --load)", ge=1)
    seed: int = _f(1234, "schedule/optimizer", "seed of the sampler, shuffles and model init", ge=0)
    bf16: bool = _f(False, "schedule/optimizer", "bf16 compute (autocast) with fp32 master weights")
    enable_dummy_optimizer: bool = _f(False, "schedule/optimizer", "allow a run where every module is frozen "
                                                                   "(no optimizer step)")
    calculate_per_sample_loss: bool = _f(False, "schedule/optimizer", "loss: token mean per sample, then mean over "
                                                                      "the global batch (= loss_type per_sample_loss)")
    calculate_per_token_loss: bool = _f(False, "schedule/optimizer", "loss: sum over the global batch / its trained "
                                                                     "tokens (= loss_type per_token_loss)")
    # parallel sizes (parallel/dims.py resolves and checks them; stages: parallel/pp.py)
    tensor_model_parallel_size: int = _f(1, "parallel", "TP size: attention/MLP/vocab split over TP ranks", ge=1)
    pipeline_model_parallel_size: int = _f(1, "parallel", "PP size: text layers split into stages by model.json "
                                           "pipeline_num_layers (1F1B schedule)",
                                           ge=1)
    virtual_pipeline_model_parallel_size: int | None = _f(None, "parallel", "VPP size: model chunks per PP rank (interleaved 1F1B; "
                                                          "pipeline_num_layers as a list of lists)",
                                                          ge=1)
    context_parallel_size: int = _f(1, "parallel", "CP size: the sequence split over CP ranks (Ulysses)", ge=1)
    #: any string parses; parallel/dims.py refuses what is not implemented, naming the flag
    context_parallel_algo: str = _f("ulysses_cp_algo", "parallel", "CP algorithm; only ulysses_cp_algo")
    expert_model_parallel_size: int = _f(1, "parallel", "EP size: MoE experts spread over EP ranks", ge=1)
    hetero_parallel: bool = _f(False, "parallel", "encoders with model.json image_encoder / audio_encoder tp 1 run "
                                                  "data-parallel over the LLM's TP group (parallel/hetero.py)")
    init_model_with_meta_device: bool = _f(False, "parallel", "build on the meta device; each rank reads only its "
                                                              "own shards (large models)")
    use_torch_fsdp2: bool = _f(True, "parallel", "accepted: FSDP2 is always used")
    distributed_timeout_minutes: int = _f(10, "parallel", "timeout of collective operations, in minutes", ge=1)
    # checkpoints
    load: str | None = _f(None, "checkpoint", "HF folder, mm-convert output, or a save dir to resume")
    save: str | None = _f(None, "checkpoint", "save dir: iter_XXXXXXX/ DCP checkpoints + "
                                              "latest_checkpointed_iteration.txt")
    save_interval: int | None = _f(None, "checkpoint", "save every N steps (needs --save; always at the end)", ge=1)
    no_load_optim: bool = _f(False, "checkpoint", "resume without the saved optimizer state")
    no_load_rng: bool = _f(False, "checkpoint", "resume without the saved RNG states")
    no_save_optim: bool = _f(False, "checkpoint", "save without optimizer state (smaller; cannot resume exactly)")
    no_save_rng: bool = _f(False, "checkpoint", "save without RNG states")
    # LoRA (train/lora.py): adapters through peft on the target modules of the unfrozen model.json modules
    lora_target_modules: list[str] | None = _f(
        None, "LoRA", "train LoRA adapters on these modules (Megatron names linear_qkv linear_proj linear_fc1 "
                      "linear_fc2, or HF module names such as q_proj); base weights stay frozen")
    lora_r: int = _f(8, "LoRA", "LoRA rank", ge=1)
    lora_alpha: int = _f(16, "LoRA", "LoRA alpha (adapter output scaled by alpha / r)", ge=1)
    lora_dropout: float = _f(0.0, "LoRA", "dropout on the adapters' input, in [0, 1)", ge=0, lt=1)
    load_base_model: str | None = _f(None, "LoRA", "the base model (HF folder or mm-convert output) the adapters "
                                                   "train on [default: --load, or the base a resumed LoRA "
                                                   "checkpoint records]")
    # DPO (train/dpo.py): on when data.json attr.ranking is true (preference pairs)
    dpo_beta: float = _f(0.1, "DPO", "DPO beta: weight of the reward margin against the KL to the reference (> 0)",
                         gt=0)
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge"] = _f(
        "sigmoid", "DPO", "DPO loss: sigmoid (the DPO paper), ipo (length-normalised log-probs) or hinge")
    dpo_label_smoothing: float = _f(0.0, "DPO", "share of pairs assumed mislabelled, in [0, 0.5] (sigmoid only)",
                                    ge=0, le=0.5)
    pref_ftx: float = _f(0.0, "DPO", "add this x the SFT loss (token mean of the chosen answer) to the DPO loss",
                         ge=0)
    ref_model: str | None = _f(None, "DPO", "reference weights (HF folder or mm-convert output) [default: the "
                                            "starting weights: --load, or under LoRA the base with the adapters "
                                            "off (no second copy)]")
    # logging and eval
    log_interval: int = _f(1, "logging", "print an iteration line every N steps", ge=1)
    log_tps: bool = _f(False, "logging", "add tokens/s to the iteration lines")
    eval_interval: int | None = _f(None, "logging", "validation loss every N steps (data.json val_dataset / "
                                                    "val_rate)", ge=1)
    eval_iters: int = _f(0, "logging", "global batches per validation (0: no validation)", ge=0)
    # progress, dashboards and plots (train/report.py)
    no_progress_bar: bool = _f(False, "logging", "no tqdm progress bar (shown on rank 0 only when stderr is a terminal)")
    tensorboard_dir: str | None = _f(None, "logging", "TensorBoard event files go here (default: <--save>/tensorboard; "
                                                      "none without --save)")
    wandb_project: str | None = _f(None, "logging", "log the scalars to this Weights & Biases project (when wandb is "
                                                    "installed; skipped with a note otherwise)")
    wandb_exp_name: str | None = _f(None, "logging", "the Weights & Biases run name (default: wandb's)")

    @model_validator(mode="after")
    def _check(self):
        if self.global_batch_size is not None and self.global_batch_size < self.micro_batch_size:
            raise ValueError(f"--global-batch-size {self.global_batch_size}: must be >= --micro-batch-size "
                             f"{self.micro_batch_size}")
        if self.token_budget is not None and self.token_budget < self.seq_length:
            raise ValueError(f"--token-budget {self.token_budget}: must be >= --seq-length {self.seq_length} (a "
                             f"sample can be that long); raise --token-budget or lower --seq-length")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr}: must be <= --lr {self.lr}; lower --min-lr")
        if self.calculate_per_sample_loss and self.calculate_per_token_loss:
            raise ValueError("--calculate-per-sample-loss and --calculate-per-token-loss exclude each other; "
                             "give one")
        if not self.lora_target_modules:
            given = [n for n in ("lora_r", "lora_alpha", "lora_dropout", "load_base_model") if n in self.model_fields_set]
            if given:
                raise ValueError(f"{flag_of(given[0])}: needs --lora-target-modules; add --lora-target-modules "
                                 f"linear_qkv linear_proj linear_fc1 linear_fc2 (or remove {flag_of(given[0])})")
        if self.dpo_label_smoothing > 0 and self.dpo_loss_type != "sigmoid":
            raise ValueError(f"--dpo-label-smoothing {self.dpo_label_smoothing}: only for --dpo-loss-type sigmoid; "
                             f"remove it or use sigmoid")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save; add --save DIR or remove --save-interval")
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
NOT_YET: dict[str, bool] = {"fp16": False}


# NOT_YET flags by help group: the group's title says what is missing
NOT_YET_GROUPS = {"refused flags (not implemented in this version)": ("fp16",)}


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """`omnitune train`'s own flags: how many processes, on how many nodes (torchrun's launcher,
    run inside `omnitune train`). The underscore spellings are torchrun's."""
    g = p.add_argument_group("launcher (omnitune train only; finetune_*.sh give them to torchrun)")
    g.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, metavar="N",
                   help="processes (devices) per node [default: 1]")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="number of nodes [default: 1]")
    g.add_argument("--node-rank", "--node_rank", type=int, default=0, metavar="R",
                   help="this node's rank, 0..nnodes-1 [default: 0]")
    g.add_argument("--master-addr", "--master_addr", default=None, metavar="HOST",
                   help="address of the node-rank-0 host (needed with --nnodes > 1)")
    g.add_argument("--master-port", "--master_port", type=int, default=None, metavar="PORT",
                   help="rendezvous port [default: a free port]")
    g.add_argument("--backend", choices=("pytorch", "mindspore"), default=None,
                   help="training back-end: pytorch, or mindspore (one process, from `make mindspore`'s "
                        ".venv-ms) [default: $OMNITUNE_BACKEND, else pytorch]")


class _Formatter(argparse.HelpFormatter):
    """Wraps help lines at spaces only, so a flag named in a description stays whole."""

    def _split_lines(self, text, width):
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit(2); we raise so callers can report uniformly
        if message.startswith("unrecognized arguments: "):
            raise ConfigError(f"{message.split(': ', 1)[1]}: unknown flag; {HELP_HINT} for the accepted flags")
        if message.startswith("argument "):   # "argument --lr: expected one argument"
            flag, _, what = message[len("argument "):].partition(": ")
            flag = flag.split("/")[0]
            raise ConfigError(f"{flag}: {what.replace('expected one argument', 'expected a value')}; {HELP_HINT}")
        raise ConfigError(f"{message}; {HELP_HINT}")


def _default_text(field) -> str:
    if field.is_required():
        return ""
    d = field.default
    if d is None or d is False:
        return ""
    return f" [default: {d}]"


def _metavar(name: str, field) -> str:
    """What the value looks like in --help: N (integer), X (number), {a,b} (choices), a name."""
    ann = str(field.annotation)
    if "Literal" in ann:
        return "{" + ",".join(field.annotation.__args__) + "}"
    if "int" in ann:
        return "N"
    if "float" in ann:
        return "X"
    return {"mm_data": "DATA_JSON", "mm_model": "MODEL_JSON"}.get(name, "DIR" if name in ("load", "save", "load_base_model", "ref_model") else "NAME")


def build_parser(prog: str = "omnitune.train", launcher: bool = False) -> argparse.ArgumentParser:
    """The training flags, grouped for --help; ``launcher`` adds `omnitune train`'s process flags
    (help only: cmd_train parses them itself)."""
    usage = (f"{prog} {'[--nproc-per-node N] [--nnodes M ...] ' if launcher else ''}--mm-data DATA_JSON "
             f"--mm-model MODEL_JSON --train-iters N [flags]")
    p = _Parser(prog=prog, allow_abbrev=False, usage=usage, formatter_class=_Formatter,
                description="Fine-tune a Qwen multimodal model with MindSpeed-MM's flags, data.json and "
                            f"model.json. Every flag, key and the checkpoint layout: {REFERENCE}.")
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for name, field in TrainArgs.model_fields.items():
        flag = "--" + name.replace("_", "-")
        group = groups[field.json_schema_extra["group"]]
        text = field.description + _default_text(field)
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
        elif "list" in str(field.annotation):
            group.add_argument(flag, dest=name, nargs="+", default=argparse.SUPPRESS, help=text, metavar="NAME")
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=text, metavar=_metavar(name, field))
    groups["misc"].add_argument("--dry-run", dest="dry_run__", action="store_true", default=False,
                                help="check the configs and the layout as the run does, print the plan "
                                     "(mesh, memory per rank); do not train")
    if launcher:
        add_launcher_args(p)
    ign = p.add_argument_group("ignored Megatron flags (accepted from the seed scripts; no effect: structure "
                               "comes from model.json + config.json)")
    for flag, takes in IGNORED_FLAGS.items():
        ign.add_argument("--" + flag, dest="ignored__" + flag, default=argparse.SUPPRESS, help="accepted, no effect",
                         **({"metavar": "X"} if takes else {"action": "store_true"}))
    for title, flags in NOT_YET_GROUPS.items():
        g = p.add_argument_group(title)
        for flag in flags:
            g.add_argument("--" + flag, dest="notyet__" + flag, default=argparse.SUPPRESS,
                           help="refused: not implemented in this version",
                           **({"metavar": "X"} if NOT_YET[flag] else {"action": "store_true"}))
    return p


def _join_negative_numbers(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--weight-decay -1e-2`` -> ``--weight-decay=-1e-2``: argparse takes a value like -1e-2 for a
    flag and reports "expected one argument"; joined, the range check names the real problem."""
    takes = {s for a in p._actions if a.nargs is None and a.option_strings for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in takes and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{tok}={argv[i + 1]}")
                i += 2
                continue
        out.append(tok)
        i += 1
    return out


def parse_train_args(argv: list[str]) -> tuple[TrainArgs, list[str], bool]:
    """Return (args, ignored flag names, dry_run). Raises ConfigError naming the bad flag as typed."""
    p = build_parser()
    ns = vars(p.parse_args(_join_negative_numbers(p, argv)))
    dry_run = ns.pop("dry_run__")
    ignored = sorted(k.split("__", 1)[1] for k in ns if k.startswith("ignored__"))
    notyet = sorted(k.split("__", 1)[1] for k in ns if k.startswith("notyet__"))
    if notyet:
        raise ConfigError(f"--{notyet[0]} is not implemented in this version of omnitune; remove the flag "
                          f"(bf16 is: --bf16)")
    values = {k: v for k, v in ns.items() if "__" not in k}
    for name in ("mm_data", "mm_model", "train_iters"):
        if name not in values:
            raise ConfigError(f"{flag_of(name)}: is required; add {flag_of(name)} "
                              f"{'N' if name == 'train_iters' else 'FILE'}")
    try:
        args = TrainArgs.model_validate(values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "flags") + f"; {HELP_HINT}") from None
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp is not None and vpp < 1:
        raise ConfigError(f"--virtual-pipeline-model-parallel-size {vpp}: must be >= 1")
    if vpp is not None and vpp > 1 and args.pipeline_model_parallel_size < 2:
        raise ConfigError(f"--virtual-pipeline-model-parallel-size {vpp} needs --pipeline-model-parallel-size >= 2")
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
