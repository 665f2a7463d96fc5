"""`omnitune` command: train (starts torchrun), export, generate, demo, tiny-model.

Parsing only; the work is in library code.
"""
from __future__ import annotations

import argparse
import os
import sys

from omnitune.cli.generate import cmd_chat, cmd_generate  # light: imports the inference code when run
from omnitune.cli.plot import cmd_plot


class ArgParser(argparse.ArgumentParser):
    """argparse with omnitune's error line: ``omnitune: error: --flag: what is wrong; the fix``
    (exit status 2), instead of a usage block with the message at its end."""

    def error(self, message):
        if message.startswith("argument "):   # "argument --family: invalid choice: 'foo' (choose from ...)"
            flag, _, what = message[len("argument "):].partition(": ")
            message = f"{flag.split('/')[0]}: {what}"
        print(f"omnitune: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def _free_port() -> int:
    from omnitune.parallel.mesh import _free_port as fp
    return fp()


def cmd_train(argv: list[str]) -> int:
    """`omnitune train [--nproc-per-node N] [--nnodes M --node-rank R --master-addr A --master-port P]
    <training flags>`: validate for N x M processes, then train (one process: right here; else
    through torchrun's launcher, run in this process; on M nodes, run the same command on each
    node with its --node-rank)."""
    from omnitune.config.train import add_launcher_args, build_parser

    if "-h" in argv or "--help" in argv:
        build_parser(prog="omnitune train", launcher=True).print_help()
        return 0
    p = ArgParser(prog="omnitune train", add_help=False, allow_abbrev=False)
    add_launcher_args(p)
    own, rest = p.parse_known_args(argv)
    for flag, value in (("--nproc-per-node", own.nproc_per_node), ("--nnodes", own.nnodes)):
        if value < 1:
            print(f"omnitune: error: {flag}: must be >= 1, got {value}; see omnitune train --help", file=sys.stderr)
            return 2
    if not 0 <= own.node_rank < own.nnodes:
        print(f"omnitune: error: --node-rank {own.node_rank} must be in 0..{own.nnodes - 1} (--nnodes {own.nnodes})",
              file=sys.stderr)
        return 2
    if own.nnodes > 1 and not (own.master_addr and own.master_port):
        print("omnitune: error: --nnodes > 1 needs --master-addr (the node-rank-0 host's address, the same on "
              "every node) and --master-port", file=sys.stderr)
        return 2
    backend = own.backend or os.environ.get("OMNITUNE_BACKEND") or "pytorch"
    if backend not in ("pytorch", "mindspore"):
        print(f"omnitune: error: OMNITUNE_BACKEND={backend!r}: one of pytorch, mindspore", file=sys.stderr)
        return 2
    if backend == "mindspore":   # its own folder; the PyTorch path below never imports it
        if own.nproc_per_node * own.nnodes > 1:
            print("omnitune: error: --backend mindspore runs one process (MindSpore's collectives need Ascend/GPU "
                  "communication libraries, not present on CPU); drop --nproc-per-node / --nnodes, or use the "
                  "PyTorch back-end for data parallelism", file=sys.stderr)
            return 2
        from omnitune.backends.mindspore.cli import train_main
        return train_main(rest)
    from omnitune.config.errors import ConfigError
    from omnitune.config.train import parse_train_args

    try:  # the flags alone first (pydantic only): a bad flag is reported before torch loads
        parse_train_args(rest)
    except ConfigError as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    from omnitune.train.trainer import make_plan

    try:  # configs and the layout fail here, before any process starts
        plan, dry_run = make_plan(rest, world_size=own.nproc_per_node * own.nnodes)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(plan.describe())
        return 0
    if own.nproc_per_node == 1 and own.nnodes == 1 and "RANK" not in os.environ:
        # One process: train right here (a one-rank group on loopback, as under torchrun); this
        # saves starting torchrun and a worker that would import and validate everything again.
        # (--master-port, when given, is the port of this one-rank group.)
        from omnitune.train.trainer import run

        if own.master_port:
            os.environ["MASTER_PORT"] = str(own.master_port)
        return run(plan)
    # Several: torchrun's launcher runs in this process (the configs are already checked) and
    # starts the workers; a failed worker makes it raise, which is exit status 1 as with `torchrun`.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // own.nproc_per_node)))
    node = [f"--nnodes={own.nnodes}", f"--node-rank={own.node_rank}", f"--master-addr={own.master_addr}"] \
        if own.nnodes > 1 else []
    args = get_args_parser().parse_args([f"--nproc-per-node={own.nproc_per_node}", *node,
                                         f"--master-port={own.master_port or _free_port()}",
                                         "-m", "omnitune.train", *rest])
    try:
        if _fork_workers_ok():
            _launch_forked(args, plan)
        else:
            run(args)
    except ChildFailedError as e:
        print(f"omnitune: error: training failed\n{e}", file=sys.stderr)
        return 1
    return 0


def _fork_workers_ok() -> bool:
    """Workers forked from this process (CPU only, unless OMNITUNE_WORKER_START=spawn): they inherit
    the imports and the checked plan instead of starting a new interpreter that imports torch and
    transformers and validates everything again (measured here: about 5 s of CPU per worker, the
    larger part of a short run's start-up). Accelerators keep torchrun's own start (new processes):
    a CUDA / NPU runtime touched before a fork cannot be used in the children. Nor when this
    process runs other threads (``omnitune`` called in-process by a program that has some, e.g. a
    test runner): a lock one of them held at the fork stays locked in the children (a forked
    worker hung for the whole 600 s test timeout in CI)."""
    import threading

    from omnitune.parallel.mesh import detect_device_type

    return (os.environ.get("OMNITUNE_WORKER_START", "fork") != "spawn" and threading.active_count() == 1
            and detect_device_type() == "cpu")


def _launch_forked(args, plan) -> None:
    """torchrun's agent (the same rendezvous, restarts and failure report as ``run(args)``) with
    a function entry point started by fork."""
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args

    config, _, _ = config_from_args(args)
    config.start_method = "fork"
    elastic_launch(config=config, entrypoint=_forked_worker)(plan)


def _forked_worker(plan) -> None:
    """One rank (torchrun's environment set by the agent): train the parent's plan. It returns to
    the agent's wrapper, which hands the result back and leaves with ``os._exit`` (a forked
    multiprocessing child never runs interpreter teardown); a failure exits with its status."""
    import torch

    from omnitune.train.__main__ import report_config_error
    from omnitune.train.trainer import run

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    code = run(plan, report=report_config_error)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        raise SystemExit(code)


def cmd_export(argv: list[str]) -> int:
    p = ArgParser(prog="omnitune export",
                                description="Training checkpoint -> Hugging Face folder (safetensors + configs)")
    p.add_argument("--load", required=True, help="save dir (uses latest_checkpointed_iteration.txt) or an iter_* folder")
    p.add_argument("--save", required=True, help="output HF folder")
    p.add_argument("--model-assets", default=None,
                   help="original HF folder (config, tokenizer, processor files) [default: the one recorded "
                        "in the checkpoint]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save folder")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA checkpoint: write the full HF folder with the adapters merged into the base weights "
                        "[default: a peft adapter folder for the base]")
    p.add_argument("--load-base-model", default=None, metavar="DIR",
                   help="LoRA checkpoint: the base model the adapters were trained on [default: the one recorded "
                        "in the checkpoint]")
    a = p.parse_args(argv)
    from omnitune.checkpoint.export import export_hf

    try:
        out = export_hf(a.load, a.save, a.model_assets, overwrite=a.overwrite, merge_lora=a.merge_lora,
                        base_model=a.load_base_model)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


def cmd_data(argv: list[str]) -> int:
    """`omnitune data llava-to-mllm ...`: dataset converters."""
    p = ArgParser(prog="omnitune data", description="dataset converters and inspection")
    sub = p.add_subparsers(dest="tool", required=True)
    lv = sub.add_parser("llava-to-mllm", help="LLaVA-Instruct json -> mllm json (images + messages)")
    lv.add_argument("--input", default="./data/llava_instruct_150k.json",
                    help="LLaVA-Instruct json [default: %(default)s]")
    lv.add_argument("--image-dir", default="./data/COCO2017/train2017",
                    help="folder of the COCO images it names [default: %(default)s]")
    lv.add_argument("--output", default="./data/mllm_format_llava_instruct_data.json",
                    help="mllm-format json to write [default: %(default)s]")
    lv.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    rl = sub.add_parser("rlhfv-to-dpo", help="RLHF-V (HF dataset folder / parquet) -> DPO pairs json")
    rl.add_argument("--input", default="./data/datasets/rlhf-v",
                    help="HF dataset folder or parquet files [default: %(default)s]")
    rl.add_argument("--image-dir", default="./data/rlhf_v_images/res",
                    help="folder the extracted JPEGs go to [default: %(default)s]")
    rl.add_argument("--output", default="./data/rlhf-v.json", help="DPO pairs json to write [default: %(default)s]")
    rl.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ins = sub.add_parser("inspect", help="counts and one rendered sample of a data.json")
    ins.add_argument("--mm-data", required=True, help="the data.json training would use")
    ins.add_argument("--index", type=int, default=0, help="the sample to render (after drops) [default: 0]")
    ins.add_argument("--seq-length", type=int, default=None,
                     help="the training --seq-length (default: cutoff_len if set, else 1024); "
                          "the limit is min(seq-length, cutoff_len)")
    ins.add_argument("--no-decode", action="store_true",
                     help="skip decoding every media file as training does (faster; a corrupt file then "
                          "shows only in training)")
    a = p.parse_args(argv)
    if a.tool == "inspect":
        from omnitune.config.errors import ConfigError
        from omnitune.data.tools.inspect import inspect_data
        try:
            print(inspect_data(a.mm_data, a.seq_length, a.index, decode=not a.no_decode))
        except (ConfigError, ValueError, FileNotFoundError) as e:
            print(f"omnitune: error: {e}", file=sys.stderr)
            return 2
        return 0
    from omnitune.data.tools.llava import llava_to_mllm
    from omnitune.data.tools.rlhfv import rlhfv_to_dpo

    convert = llava_to_mllm if a.tool == "llava-to-mllm" else rlhfv_to_dpo
    try:
        report = convert(a.input, a.image_dir, a.output, overwrite=a.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.output}: {report.summary()}")
    return 0


def cmd_tiny_model(argv: list[str]) -> int:
    from omnitune.models.registry import FAMILIES

    p = ArgParser(prog="omnitune tiny-model",
                                description="Write a random-weight HF folder (real Qwen tokenizer) for tests/demos")
    p.add_argument("--family", default="qwen2_vl", choices=list(FAMILIES),
                   help="model family (registry name) [default: %(default)s]")
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"],
                   help="tiny (hidden 64, 2 layers) or bench (~20-50M parameters) [default: %(default)s]")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    a = p.parse_args(argv)
    from omnitune.models.tiny import build_tiny_model

    try:
        print(build_tiny_model(a.family, a.out, a.size, overwrite=a.overwrite))
    except (FileExistsError, ValueError) as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(argv: list[str]) -> int:
    p = ArgParser(prog="omnitune demo", description="Tiny model + bundled data: train, export, generate")
    p.add_argument("--out", default="demo_out", help="working folder (model, configs, save dir) [default: %(default)s]")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes [default: %(default)s]")
    p.add_argument("--train-iters", type=int, default=None,
                   help="optimizer steps [default: the demo's own, enough to answer every bundled question]")
    a = p.parse_args(argv)
    from omnitune.cli.demo import DEMO_TRAIN_ITERS, run_demo

    return run_demo(a.out, a.nproc_per_node, a.train_iters or DEMO_TRAIN_ITERS)


COMMANDS = {"train": cmd_train, "export": cmd_export, "generate": cmd_generate, "chat": cmd_chat, "data": cmd_data,
            "tiny-model": cmd_tiny_model, "demo": cmd_demo, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    asked = bool(argv) and argv[0] in ("-h", "--help")
    if asked or not argv or argv[0] not in COMMANDS:
        print("usage: omnitune {" + ",".join(COMMANDS) + "} ...\n"
              "  train       fine-tune (MindSpeed-MM flags; --nproc-per-node N starts torchrun)\n"
              "  export      training checkpoint -> Hugging Face folder\n"
              "  generate    reply to --prompt with --image/--video/--audio, or a JSONL file of prompts\n"
              "  chat        interactive session (/image, /video, /audio, /reset, /exit)\n"
              "  data        llava-to-mllm, rlhfv-to-dpo converters; inspect a data.json\n"
              "  demo        tiny model + bundled data: train, export, reload, generate\n"
              "  plot        redraw a training save dir's metrics.png (loss, lr, tokens/s)\n"
              "  tiny-model  write a random-weight HF folder for tests\n"
              "`omnitune COMMAND --help` lists a command's flags; every flag and config key: docs/reference.md",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
