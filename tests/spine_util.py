"""Helpers for the end-to-end tests: configs for the bundled demo data, running the CLI, reading
the trainer's metrics.jsonl."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omnitune.cli.demo import demo_configs

REPO = Path(__file__).resolve().parents[1]


def write_configs(out: Path, hf_dir: Path, *, freeze: dict[str, bool] | None = None,
                  family: str | None = None) -> tuple[Path, Path]:
    """The demo's data.json/model.json for ``hf_dir``; ``family`` (registry name) sets that family's
    model_id, template and (Omni) audio encoder instead of Qwen2-VL's."""
    out.mkdir(parents=True, exist_ok=True)
    data_json, model_json = demo_configs(out, hf_dir)
    if family:
        from omnitune.models.registry import get_family

        fam = get_family(family)
        m, d = json.loads(model_json.read_text()), json.loads(data_json.read_text())
        m["model_id"] = fam.model_ids[0]
        if "omni" in fam.name:
            m["audio_encoder"] = {"audio_encoder": {"freeze": False}}
        d["dataset_param"]["basic_parameters"]["template"] = fam.template
        model_json.write_text(json.dumps(m, indent=2))
        data_json.write_text(json.dumps(d, indent=2))
    if freeze:
        m = json.loads(model_json.read_text())
        for path, value in freeze.items():
            node = m
            for part in path.split("."):
                node = node[part]
            node["freeze"] = value
        model_json.write_text(json.dumps(m, indent=2))
    return data_json, model_json


def train_flags(data_json: Path, model_json: Path, *, iters: int, save: Path, load: Path | str,
                mbs: int = 1, gbs: int = 4, extra: list[str] | None = None) -> list[str]:
    return ["--mm-data", str(data_json), "--mm-model", str(model_json), "--load", str(load),
            "--save", str(save), "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
            "--seq-length", "512", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-fraction", "0.2",
            "--clip-grad", "1.0", "--weight-decay", "0.01", "--train-iters", str(iters), "--seed", "7",
            "--log-interval", "1", *(extra or [])]


def omnitune(args: list[str], *, timeout: float = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "omnitune.cli.main", *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def losses(save: Path, key: str = "loss") -> dict[int, float]:
    """iteration -> loss (or val_loss) from metrics.jsonl (later lines win, so a resumed run overrides)."""
    out = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["iteration"]] = rec[key]
    return out
