"""Pipeline layouts side by side: step time of PP2 (1F1B) and PP2 + VPP2 (interleaved 1F1B) vs DP2, the
schedules' bubble fraction, and peak host memory per rank, measured in one run on the same model and
data.

Model: the Qwen2-VL "bench" size of the tiny builder with 4 text layers (PP2: 2 per stage; VPP2: 1 per
stage of 4), random weights, the real Qwen tokenizer; data: the bundled demo samples; fp32, AdamW,
global batch 8, micro-batch 1 (DP2: 4 micro-batches per rank and step; PP2: 8 through the pipeline).
Two processes share this machine's cores in every layout, so the ratios compare the layouts' work and
waiting on the same hardware, not accelerators. The bubble fraction is the schedule's idle share,
(P - 1) / (V x M + P - 1) for M micro-batches, P stages per rank group and V chunks per rank; the
step-time ratio shows what the padding to one shape per step, the activation sends and the bubble
cost together here.

    .venv/bin/python bench/pipeline.py [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PP = ["--pipeline-model-parallel-size", "2"]
LAYOUTS = [("DP2", []), ("PP2", PP), ("PP2 + VPP2", [*PP, "--virtual-pipeline-model-parallel-size", "2"])]


def bubble(pp: int, vpp: int, micro: int) -> float:
    return (pp - 1) / (vpp * micro + pp - 1) if pp > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    from omnitune.cli.demo import demo_configs
    from omnitune.models.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="omnitune_bench_pipeline_"))
    hf_dir = build_tiny_model("qwen2_vl", root / "model", size="bench", text_overrides={"num_hidden_layers": 4})
    data_json, model_json = demo_configs(root, hf_dir)
    gbs = 8
    rows = []
    for name, flags in LAYOUTS:
        save = root / re.sub(r"\W", "", name)
        cmd = [sys.executable, "-m", "omnitune.cli.main", "train", "--nproc-per-node", "2",
               "--mm-data", str(data_json), "--mm-model", str(model_json), "--load", str(hf_dir),
               "--save", str(save), "--save-interval", str(10 ** 9), "--no-save-optim", "--no-save-rng",
               "--micro-batch-size", "1", "--global-batch-size", str(gbs), "--seq-length", "512", "--lr", "1e-4",
               "--lr-decay-style", "constant", "--train-iters", str(args.steps), "--seed", "1", *flags]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        recs = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        times = sorted(rec["step_time"] for rec in recs[1:])     # first step: warm-up (and schedule build)
        peak = re.findall(r"rank (\d+) ([\d.]+) GiB", r.stdout.rsplit("peak memory", 1)[-1])
        pp = 2 if flags else 1
        vpp = 2 if "--virtual-pipeline-model-parallel-size" in flags else 1
        micro = gbs // (2 // pp)   # micro-batches through one pipeline per step
        rows.append((name, times[len(times) // 2], bubble(pp, vpp, micro), peak, recs[-1]["loss"]))
    base = rows[0][1]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.steps} steps, median step after the first")
    print(f"{'layout':<11} {'step s':>7} {'step/DP2':>8} {'bubble':>7} {'peak RSS per rank (GiB)':>26} {'last loss':>9}")
    for name, t, b, peak, loss in rows:
        mem = ", ".join(f"r{k} {v}" for k, v in peak)
        print(f"{name:<11} {t:>7.3f} {t / base:>8.2f} {b:>7.1%} {mem:>26} {loss:>9.4f}")


if __name__ == "__main__":
    main()
