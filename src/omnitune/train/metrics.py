"""Per-step logging in Megatron's line format (the seed scripts' awk parsing works on it), a
machine-readable ``metrics.jsonl`` beside the checkpoints, the --log-tps summary, and (through
train/report.py) the progress bar, TensorBoard / W&B scalars, summary.json and metrics.png."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from omnitune.train.report import (ProgressBar, ScalarSinks, format_summary, plot_metrics, sig3,
                                   truncate_metrics, write_summary)


class Logger:
    """Rank 0 writes; other ranks only join :meth:`finish`'s caller's collectives.

    ``start_iteration`` is the iteration the run starts from (a resumed checkpoint's): records of
    later iterations in an existing metrics.jsonl are dropped, since this run does those steps
    again (so each iteration is in the file once)."""

    def __init__(self, is_main: bool, train_iters: int, log_tps: bool = False, metrics_file: Path | None = None,
                 *, start_iteration: int = 0, progress_bar: bool = False, tensorboard_dir: str | None = None,
                 wandb_project: str | None = None, wandb_name: str | None = None, run_config: dict | None = None):
        self.is_main, self.train_iters, self.log_tps = is_main, train_iters, log_tps
        self.metrics_file = metrics_file
        self.start_iteration = start_iteration
        self.total_tokens = 0.0     # --log-tps: steps after the first
        self.total_time = 0.0
        self.all_tokens = 0.0       # summary: every step of this run
        self.all_time = 0.0
        self.steps = 0
        self.last_loss = self.last_val_loss = None
        self.bar = ProgressBar(train_iters, start_iteration, enabled=progress_bar and is_main)
        self.sinks = None
        if not is_main:
            return
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            dropped = truncate_metrics(metrics_file, start_iteration)
            if dropped:
                self.write(f"{metrics_file}: dropped {dropped} record(s) after iteration {start_iteration} "
                           f"(this run redoes those steps)")
        self.sinks = ScalarSinks(tensorboard_dir, start_iteration, wandb_project, wandb_name,
                                 str(metrics_file.parent) if metrics_file is not None else None, run_config,
                                 note=self.write)

    def write(self, line: str, file=None) -> None:
        """Print a line on rank 0 (above the progress bar when there is one)."""
        if self.is_main:
            self.bar.write(line, file=file)

    def step(self, iteration: int, consumed: int, dt: float, lr: float, gbs: int, stats: dict, show: bool) -> None:
        if not self.is_main:
            return
        self.steps += 1
        self.all_tokens += stats["tokens"]
        self.all_time += dt
        if self.steps > 1:  # the first step includes warm-up (allocations, worker start)
            self.total_tokens += stats["tokens"]
            self.total_time += dt
        tps = stats["tokens"] / dt if dt > 0 else 0.0
        self.last_loss = stats["loss"]
        extra = stats.get("extra", {})   # DPO: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy
        rec = {"iteration": iteration, "consumed_samples": consumed, "loss": stats["loss"], "lr": lr,
               "grad_norm": stats["grad_norm"], "tokens": stats["tokens"], "step_time": dt, "tokens_per_s": tps,
               **extra}
        if self.metrics_file is not None:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.sinks.log(iteration, {"train/loss": stats["loss"], "train/lr": lr, "train/grad_norm": stats["grad_norm"],
                                   "train/tokens_per_s": tps, **{"train/" + k: v for k, v in extra.items()}})
        if show:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            line = (f"[{stamp}] iteration {iteration:8d}/{self.train_iters:8d} | consumed samples: {consumed:12d} | "
                    f"elapsed time per iteration (ms): {dt * 1000:.1f} | learning rate: {lr:.6E} | "
                    f"global batch size: {gbs:5d} | lm loss: {stats['loss']:.6E} | grad norm: {stats['grad_norm']:.4f} | "
                    f"tokens/s: {sig3(tps)} |")
            if self.log_tps:
                line += f" tokens per sample: {stats['tokens'] / gbs:.1f} |"
            for k, v in extra.items():
                line += f" {k}: {v:.4f} |"
            self.write(line)
        self.bar.update(stats["loss"], tps)

    def eval(self, iteration: int, loss: float) -> None:
        if not self.is_main:
            return
        self.last_val_loss = loss
        if self.metrics_file is not None:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({"iteration": iteration, "val_loss": loss}) + "\n")
        self.sinks.log(iteration, {"val/loss": loss})
        ppl = math.exp(min(loss, 20.0))
        self.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] validation loss at iteration {iteration} | "
                   f"lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |")

    def summary(self, last_iteration: int, peak_memory: list[dict]) -> dict:
        """What this run did (the steps it ran, not those of the runs it resumed)."""
        return {
            "first_iteration": self.start_iteration + 1 if self.steps else self.start_iteration,
            "last_iteration": last_iteration, "steps": self.steps, "train_iters": self.train_iters,
            "tokens": self.all_tokens, "time_s": self.all_time,
            "tokens_per_s": self.all_tokens / self.all_time if self.all_time > 0 else 0.0,
            "tokens_per_s_after_first": self.total_tokens / self.total_time if self.total_time > 0 else None,
            "final_loss": self.last_loss, "final_val_loss": self.last_val_loss,
            "peak_memory": peak_memory,
        }

    def finish(self, last_iteration: int, peak_memory: list[dict]) -> dict | None:
        """End of training (rank 0): the --log-tps line, the summary (printed, summary.json) and
        metrics.png in the save dir. ``peak_memory``: every rank's, gathered by the caller."""
        if not self.is_main:
            return None
        self.bar.close()
        self.sinks.close()
        if self.log_tps and self.total_time > 0:
            self.write(f"[log-tps] steps {self.steps} (first excluded from timing) | tokens {self.total_tokens:.0f} | "
                       f"Consumed Tokens per Second: {sig3(self.total_tokens / self.total_time)}")
        s = self.summary(last_iteration, peak_memory)
        self.write(format_summary(s))
        if self.metrics_file is not None:
            save_dir = self.metrics_file.parent
            write_summary(save_dir, s)
            try:
                png, _ = plot_metrics(save_dir)
            except ImportError:
                self.write("metrics plot: matplotlib is not installed; no metrics.png (pip install matplotlib)")
            else:
                self.write(f"wrote {save_dir / 'summary.json'} and {png} (redraw: omnitune plot {save_dir})")
        return s

    def close(self) -> None:
        """Release the bar and the event writers (also after a failed run)."""
        self.bar.close()
        if self.sinks is not None:
            self.sinks.close()
