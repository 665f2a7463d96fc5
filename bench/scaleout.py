"""Scale-out layouts side by side: per-rank bytes of parameters + gradients + AdamW state, and step
time, for one process, DP4, DP2 x TP2 and TP4, measured in one run on the same model and data.

Model: the Qwen2-VL "bench" size of the tiny builder with 4 key/value heads (so TP4 is a valid
layout), random weights, the real Qwen tokenizer; data: the bundled demo samples; fp32, AdamW,
global batch 8, micro-batch 1. On this 2-core CPU machine several gloo processes share 2 cores, so
the step times show the communication and oversubscription cost, not what accelerators would do;
the memory columns are what each rank really holds (local shards of every DTensor).

    .venv/bin/python bench/scaleout.py [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [("1 process", 1, []), ("DP4", 4, []), ("DP2 x TP2", 4, ["--tensor-model-parallel-size", "2"]),
           ("TP4", 4, ["--tensor-model-parallel-size", "4"])]


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from omnitune.parallel.mesh import init_distributed
    from omnitune.train.trainer import Trainer, make_plan

    plan, _ = make_plan(argv)
    d = init_distributed()
    t = Trainer(plan, d)
    t.fit()
    params = [p for p in t.model.parameters()]
    sizes = torch.tensor([
        sum(_local_bytes(p) for p in params),
        sum(_local_bytes(p) for p in params if p.requires_grad),   # gradients: one per trainable shard
        sum(_local_bytes(v) for st in t.optimizer.state.values() for v in st.values()
            if torch.is_tensor(v) and v.dim() > 0),
    ], dtype=torch.float64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if d.is_main:
        print("BENCH " + json.dumps({"params": sizes[0].item(), "grads": sizes[1].item(), "optim": sizes[2].item()}),
              flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worker", action="store_true")
    args, rest = ap.parse_known_args()
    if args.worker:
        return worker(rest)
    from omnitune.cli.demo import demo_configs
    from omnitune.models.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="omnitune_bench_scaleout_"))
    hf_dir = build_tiny_model("qwen2_vl", root / "model", size="bench", text_overrides={"num_key_value_heads": 4})
    data_json, model_json = demo_configs(root, hf_dir)
    rows = []
    for name, nproc, flags in LAYOUTS:
        save = root / name.replace(" ", "")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + len(rows) * 7), str(Path(__file__).resolve()), "--worker",
               "--mm-data", str(data_json), "--mm-model", str(model_json), "--load", str(hf_dir),
               "--save", str(save), "--save-interval", str(10 ** 9), "--no-save-optim", "--no-save-rng",
               "--micro-batch-size", "1", "--global-batch-size", "8", "--seq-length", "512", "--lr", "1e-4",
               "--lr-decay-style", "constant", "--train-iters", str(args.steps), "--seed", "1", *flags]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)), PYTHONPATH=str(REPO / "src"))
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        mem = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("BENCH "))[6:])
        recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        times = sorted(rec["step_time"] for rec in recs[1:])     # first step: warm-up
        rows.append((name, nproc, mem, times[len(times) // 2], recs[-1]["loss"]))
    base_mem = sum(rows[0][2].values())
    base_t = rows[0][3]
    print(f"{'layout':<11} {'procs':>5} {'params MiB':>10} {'grads MiB':>9} {'AdamW MiB':>9} {'total/1proc':>11} "
          f"{'step s':>7} {'step/1proc':>10} {'last loss':>9}")
    for name, nproc, mem, t, loss in rows:
        tot = sum(mem.values())
        print(f"{name:<11} {nproc:>5} {mem['params'] / 2**20:>10.1f} {mem['grads'] / 2**20:>9.1f} "
              f"{mem['optim'] / 2**20:>9.1f} {tot / base_mem:>11.3f} {t:>7.3f} {t / base_t:>10.2f} {loss:>9.4f}")


if __name__ == "__main__":
    main()
