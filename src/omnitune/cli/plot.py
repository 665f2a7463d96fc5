"""`omnitune plot SAVE_DIR`: redraw a training save dir's metrics.png (loss, validation loss,
learning rate, tokens/s over iterations) from its metrics.jsonl, e.g. while a run goes on or
after copying the folder elsewhere."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_plot(argv: list[str]) -> int:
    from omnitune.train.report import PLOT_NAME, format_summary, plot_metrics, read_metrics

    p = argparse.ArgumentParser(prog="omnitune plot", description="Redraw the metrics plot of a training save dir")
    p.add_argument("save_dir", metavar="SAVE_DIR", help="the --save folder of a training run (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help=f"PNG to write (default: SAVE_DIR/{PLOT_NAME})")
    a = p.parse_args(argv)
    save = Path(a.save_dir)
    metrics = save / "metrics.jsonl"
    if not save.is_dir():
        return _error(f"{a.save_dir}: no such folder; give the --save folder of a training run")
    if not metrics.is_file():
        return _error(f"{a.save_dir}: no metrics.jsonl in it (not a training save dir, or no step has run yet); "
                      f"give the --save folder of a training run")
    if not any("iteration" in r for r in read_metrics(metrics)):
        return _error(f"{a.save_dir}/metrics.jsonl: no records to plot; run at least one training step first")
    if a.out and Path(a.out).suffix.lower() != ".png":
        return _error(f"--out {a.out}: the plot is a PNG; give a path ending in .png")
    path, points = plot_metrics(save, a.out)
    summary = save / "summary.json"
    if summary.is_file():
        import json
        try:
            print(format_summary(json.loads(summary.read_text())))
        except (ValueError, KeyError, TypeError):
            print(f"(summary.json unreadable: {summary})")
    print(f"wrote {path} (" + ", ".join(f"{k}: {n} points" for k, n in points.items()) + ")")
    return 0


def _error(msg: str) -> int:
    print(f"omnitune: error: {msg}", file=sys.stderr)
    return 2
