"""What people look at during and after a run: the progress bar, TensorBoard / Weights & Biases
scalars, the run summary (summary.json) and the metrics plot (metrics.png).

The Megatron-style iteration lines (train/metrics.py) stay the record for log files and the seed
scripts' parsing; everything here is on top of them and only on rank 0 (except the peak-memory
gather, a collective every rank joins). Heavy imports (tqdm, tensorboard, matplotlib, wandb) are
made only when the piece is used.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

PLOT_NAME = "metrics.png"
SUMMARY_NAME = "summary.json"
#: PNG text chunk holding the number of points drawn per panel (so a reader can check the plot)
PLOT_POINTS_KEY = "omnitune-points"


def sig3(x: float) -> str:
    """``x`` rounded to 3 significant digits, written without an exponent: 12345 -> "12300",
    9.876 -> "9.88", 0.01234 -> "0.0123" (a slow CPU run's tokens/s is never shown as "0")."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = 2 - math.floor(math.log10(abs(x)))
    return f"{round(x, decimals):.{max(decimals, 0)}f}"


# ------------------------------------------------------------------------------ metrics.jsonl
def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: Path, last_iteration: int) -> int:
    """Keep only the records up to ``last_iteration`` (the checkpoint a run starts from): the
    records after it belong to steps this run does again. Rewritten through a temp file. Returns
    the number of records dropped."""
    if not path.is_file():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r.get("iteration", 0) <= last_iteration]
    if len(kept) == len(records) and len(records) == len(path.read_text().splitlines()):
        return 0
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return len(records) - len(kept)


# ------------------------------------------------------------------------------ progress bar
class ProgressBar:
    """One tqdm line with ETA (rank 0, only when stderr is a terminal and not turned off).
    Lines printed through :meth:`write` go above the bar instead of through it."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, file=None):
        self.file = file if file is not None else sys.stderr
        self.bar = None
        if enabled and _isatty(self.file):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", file=self.file,
                            dynamic_ncols=True, leave=True, mininterval=0.5, position=0,
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| ETA {remaining} "
                                       "(elapsed {elapsed}, {rate_fmt}{postfix})")

    def update(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4g}, {sig3(tokens_per_s)} tokens/s", refresh=False)
            self.bar.update(1)

    def write(self, line: str, file=None) -> None:
        if self.bar is not None:
            self.bar.write(line, file=file or sys.stdout)
            (file or sys.stdout).flush()
        else:
            print(line, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------ scalar sinks
class ScalarSinks:
    """TensorBoard event files (when a folder is given) and Weights & Biases (when a project is
    asked for and the package is installed; skipped with one note when it is not)."""

    def __init__(self, tensorboard_dir: str | None, start_iteration: int = 0, wandb_project: str | None = None,
                 wandb_name: str | None = None, wandb_dir: str | None = None, config: dict | None = None,
                 note=print):
        self.tb = None
        self.wandb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                note("tensorboard: the package is not installed; no event files (pip install tensorboard)")
            else:
                # a resumed run drops the events after its checkpoint (they are redone)
                self.tb = SummaryWriter(log_dir=tensorboard_dir,
                                        purge_step=start_iteration + 1 if start_iteration else None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                note(f"--wandb-project {wandb_project}: wandb is not installed; not logging to Weights & Biases "
                     f"(pip install wandb to enable it)")
            else:
                self.wandb = wandb.init(project=wandb_project, name=wandb_name, dir=wandb_dir, config=config or {},
                                        resume="allow")

    def log(self, iteration: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, iteration)
        if self.wandb is not None:
            self.wandb.log(values, step=iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# ------------------------------------------------------------------------------ summary
def peak_memory_per_rank(device) -> list[dict]:
    """Peak memory of every rank (a collective: every rank calls it). Accelerators: the peak of
    allocated device memory; CPU: the peak resident set size of the process."""
    import resource

    import torch
    import torch.distributed as dist

    mine = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        mine["device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    elif device.type == "npu" and hasattr(torch, "npu"):
        mine["device_bytes"] = int(torch.npu.max_memory_allocated(device))
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return [dict(rank=r, **m) for r, m in enumerate(everyone)]
    return [dict(rank=0, **mine)]


def format_summary(s: dict) -> str:
    """The run summary as printed at the end of training."""
    peaks = ", ".join(f"rank {p['rank']} " + _gib(p.get("device_bytes", p["rss_bytes"])) for p in s["peak_memory"])
    kind = "device" if any("device_bytes" in p for p in s["peak_memory"]) else "host RSS"
    line = (f"[summary] iterations {s['first_iteration']}..{s['last_iteration']} ({s['steps']} steps) | "
            f"tokens {s['tokens']:.0f} | time {s['time_s']:.1f} s | tokens/s {sig3(s['tokens_per_s'])}")
    if s.get("tokens_per_s_after_first") is not None:
        line += f" ({sig3(s['tokens_per_s_after_first'])} after the first step)"
    if s.get("final_loss") is not None:
        line += f" | final loss {s['final_loss']:.4f}"
    if s.get("final_val_loss") is not None:
        line += f" | final validation loss {s['final_val_loss']:.4f}"
    return line + f" | peak memory ({kind}) {peaks}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def write_summary(save_dir: Path, summary: dict) -> Path:
    path = Path(save_dir) / SUMMARY_NAME
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ plot
def plot_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Panel name -> (iterations, values) from metrics.jsonl records (a later record of an
    iteration wins)."""
    keys = {"loss": "loss", "validation loss": "val_loss", "learning rate": "lr", "tokens/s": "tokens_per_s"}
    out = {}
    for panel, key in keys.items():
        points = {r["iteration"]: float(r[key]) for r in records if key in r and "iteration" in r}
        its = sorted(points)
        out[panel] = (its, [points[i] for i in its])
    return out


def plot_metrics(save_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, dict[str, int]]:
    """Draw loss / validation loss / learning rate / tokens/s over iterations from
    ``save_dir``/metrics.jsonl into a PNG (default ``save_dir``/metrics.png, written through a temp
    file). Returns (path, points drawn per panel); the counts are also stored in the PNG's
    ``omnitune-points`` text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save_dir = Path(save_dir)
    series = plot_series(read_metrics(save_dir / "metrics.jsonl"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    drawn = {}
    for ax, (panel, (xs, ys)) in zip(axes.flat, series.items()):
        if xs:
            (line,) = ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3)
            drawn[panel] = len(line.get_xdata())
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            drawn[panel] = 0
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    title = str(save_dir)
    summary = save_dir / SUMMARY_NAME
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            title += f"  ({s['tokens']:.0f} tokens, {s['time_s']:.0f} s, {sig3(s['tokens_per_s'])} tokens/s)"
        except (ValueError, KeyError, TypeError):
            pass
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(out) if out else save_dir / PLOT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100, metadata={PLOT_POINTS_KEY: json.dumps(drawn)})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path, drawn
