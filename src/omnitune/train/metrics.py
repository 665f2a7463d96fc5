"""Per-step logging in Megatron's line format (the seed scripts' awk parsing works on it), a
machine-readable ``metrics.jsonl`` beside the checkpoints, and the --log-tps summary."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class Logger:
    def __init__(self, is_main: bool, train_iters: int, log_tps: bool = False, metrics_file: Path | None = None):
        self.is_main, self.train_iters, self.log_tps = is_main, train_iters, log_tps
        self.metrics_file = metrics_file
        self.total_tokens = 0.0
        self.total_time = 0.0
        self.steps = 0
        if is_main and metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)

    def step(self, iteration: int, consumed: int, dt: float, lr: float, gbs: int, stats: dict, show: bool) -> None:
        if not self.is_main:
            return
        self.steps += 1
        if self.steps > 1:  # the first step includes warm-up (allocations, worker start)
            self.total_tokens += stats["tokens"]
            self.total_time += dt
        tps = stats["tokens"] / dt if dt > 0 else 0.0
        rec = {"iteration": iteration, "consumed_samples": consumed, "loss": stats["loss"], "lr": lr,
               "grad_norm": stats["grad_norm"], "tokens": stats["tokens"], "step_time": dt, "tokens_per_s": tps}
        if self.metrics_file is not None:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if show:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            line = (f"[{stamp}] iteration {iteration:8d}/{self.train_iters:8d} | consumed samples: {consumed:12d} | "
                    f"elapsed time per iteration (ms): {dt * 1000:.1f} | learning rate: {lr:.6E} | "
                    f"global batch size: {gbs:5d} | lm loss: {stats['loss']:.6E} | grad norm: {stats['grad_norm']:.4f} | "
                    f"tokens/s: {tps:.0f} |")
            if self.log_tps:
                line += f" tokens per sample: {stats['tokens'] / gbs:.1f} |"
            print(line, flush=True)

    def eval(self, iteration: int, loss: float) -> None:
        if not self.is_main:
            return
        if self.metrics_file is not None:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({"iteration": iteration, "val_loss": loss}) + "\n")
        ppl = math.exp(min(loss, 20.0))
        print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] validation loss at iteration {iteration} | "
              f"lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |", flush=True)

    def finish(self) -> None:
        if not self.is_main or not self.log_tps:
            return
        if self.total_time > 0:
            print(f"[log-tps] steps {self.steps} (first excluded from timing) | tokens {self.total_tokens:.0f} | "
                  f"Consumed Tokens per Second: {self.total_tokens / self.total_time:.1f}", flush=True)
