"""Scale-out through the real CLI (issue 9 acceptance), tiny models on gloo:

- per family, each layout (TP2, CP2, DP2 x TP2, DP2 x CP2, EP2 for MoE) trains 10 iterations of the
  same global batches as one process (global batch 4, micro-batch 1: the one process accumulates 4
  micro-batches) and logs the same per-step losses (1e-4 relative) and step-1 gradient norm (1e-5);
  the data have images, videos (and audio for Omni) and odd sequence lengths (CP pads them);
- a DP2 x TP2 checkpoint at iteration 5 resumes at DP4 and in one process: iterations 6..10 give the
  uninterrupted DP2 x TP2 run's losses;
- two "nodes" of 2 processes on the loopback address (torchrun --nnodes 2) give the one-node run's
  losses.

The gradient-level parity of each parallel piece is in test_tp.py, test_cp.py, test_ep.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spine_util import REPO, losses, omnitune, train_flags
from test_family_e2e import SEQ, _configs

pytestmark = pytest.mark.slow

ITERS = 10
LAYOUTS = {   # name -> (processes, flags)
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "dp2_tp2": (4, ["--tensor-model-parallel-size", "2"]),
    "dp2_cp2": (4, ["--context-parallel-size", "2"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
}
CASES = [("qwen2_vl", ["tp2", "cp2", "dp2_tp2", "dp2_cp2"]),
         ("qwen2_5_omni", ["tp2"])]
# Qwen3-VL-MoE's layouts (TP2, CP2, DP2 x TP2, DP2 x CP2, EP2) are in test_scaleout_moe.py: a file of
# their own, so make test's workers (pytest-xdist, one file per worker) run them beside these
MOE_CASE = ("qwen3_vl_moe", ["tp2", "cp2", "dp2_tp2", "dp2_cp2", "ep2"])


def _flags(data_json, model_json, save, load, extra=()):
    return train_flags(data_json, model_json, iters=ITERS, save=save, load=load, mbs=1, gbs=4,
                       extra=["--seq-length", str(SEQ), "--lr", "5e-3", "--min-lr", "1e-3", "--save-interval", "5",
                              *extra])


def _metric(save: Path, key: str) -> dict[int, float]:
    return losses(save, key)


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def family_runs(tiny_model_dir, tmp_path_factory):
    """family -> (data.json, model.json, hf_dir, root, one-process run's save folder)."""
    out = {}

    def get(name):
        if name not in out:
            from omnitune.models.registry import get_family

            root = tmp_path_factory.mktemp(name)
            hf_dir = tiny_model_dir(name)
            data_json, model_json, _, _ = _configs(get_family(name), hf_dir, root)
            one = root / "one"
            omnitune(["train", *_flags(data_json, model_json, one, hf_dir)])
            out[name] = (data_json, model_json, hf_dir, root, one)
        return out[name]
    return get


@pytest.mark.parametrize("name,layouts", CASES, ids=[c[0] for c in CASES])
def test_layouts_match_one_process(name, layouts, family_runs):
    check_layouts(name, layouts, family_runs)


def check_layouts(name, layouts, family_runs, table=None, model_json_for=None, marker=None):
    """Each layout of ``table`` (name -> (processes, flags, ...); default LAYOUTS) logs the one-process
    run's losses. ``model_json_for(layout, model_json, root)``: the model.json a layout trains with;
    ``marker``: text (or list of texts) its log must show (default: the world size)."""
    data_json, model_json, hf_dir, root, one = family_runs(name)
    ref, ref_gn = _metric(one, "loss"), _metric(one, "grad_norm")
    assert sorted(ref) == list(range(1, ITERS + 1))
    report = {}
    for lay in layouts:
        nproc, flags = (table or LAYOUTS)[lay][:2]
        mj = model_json_for(lay, model_json, root) if model_json_for else model_json
        save = root / lay
        r = omnitune(["train", "--nproc-per-node", str(nproc), *_flags(data_json, mj, save, hf_dir, flags)])
        got, gn = _metric(save, "loss"), _metric(save, "grad_norm")
        worst = max(abs(got[i] - ref[i]) / abs(ref[i]) for i in ref)
        report[lay] = f"{worst:.1e}"
        assert all(_close(got[i], ref[i], 1e-4) for i in ref), (lay, got, ref)
        assert _close(gn[1], ref_gn[1], 1e-5), (lay, gn[1], ref_gn[1])
        for m in ([marker] if isinstance(marker, str) else marker or [f"world {nproc}"]):
            assert m in r.stdout, (lay, m, r.stdout[-3000:])
    print(f"{name}: worst relative loss difference over {ITERS} steps: {report}")
    if name == "qwen3_vl_moe" and "dp2_tp2" in layouts:
        _export_and_dcp_to_hf_read_a_tp_checkpoint(root / "dp2_tp2", hf_dir, root)


def _export_and_dcp_to_hf_read_a_tp_checkpoint(save: Path, hf_dir: Path, root: Path) -> None:
    """A checkpoint saved at DP2 x TP2 is layout-free: `omnitune export` and mm-convert's dcp_to_hf
    both turn it into the same HF weights (the trained ones, not the original)."""
    from safetensors.torch import load_file

    from omnitune.cli.main import main as cli_main
    from omnitune.cli.mm_convert import main as mm_convert

    def weights(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    assert cli_main(["export", "--load", str(save), "--save", str(root / "export")]) == 0
    assert mm_convert(["Qwen3VLConverter", "dcp_to_hf", "--load_dir", str(save / "iter_0000010"),
                       "--save_dir", str(root / "dcp_to_hf"), "--model_assets_dir", str(hf_dir)]) == 0
    a, b, orig = weights(root / "export"), weights(root / "dcp_to_hf"), weights(hf_dir)
    assert set(a) == set(b) == set(orig)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], orig[k]) for k in a)


def test_checkpoint_resumes_at_other_layouts_and_two_nodes(family_runs):
    data_json, model_json, hf_dir, root, one = family_runs("qwen2_vl")
    straight = root / "dp2_tp2"      # written by test_layouts_match_one_process (saves at 5, 10), else here
    tp_flags = LAYOUTS["dp2_tp2"][1]
    if not (straight / "iter_0000005").is_dir():
        omnitune(["train", "--nproc-per-node", "4", *_flags(data_json, model_json, straight, hf_dir, tp_flags)])
    ref = _metric(straight, "loss")

    for nproc in (4, 1):   # DP4, one process
        resumed = root / f"resume_{nproc}"
        shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("iter_0000010"))
        (resumed / "latest_checkpointed_iteration.txt").write_text("5")
        lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
        (resumed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines
                                                       if m.get("iteration", 0) <= 5))
        r = omnitune(["train", "--nproc-per-node", str(nproc), *_flags(data_json, model_json, resumed, resumed)])
        assert "at iteration 5" in r.stdout and "resharded to" in r.stdout, r.stdout[-2000:]
        got = _metric(resumed, "loss")
        for i in range(6, ITERS + 1):
            assert _close(got[i], ref[i], 1e-5), (nproc, i, got[i], ref[i])

    # two nodes x 2 processes on loopback (each "node" is an `omnitune train` with its --node-rank)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save = root / "two_nodes"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "omnitune.cli.main", "train", "--nproc-per-node", "2",
                               "--nnodes", "2", "--node-rank", str(n), "--master-addr", "127.0.0.1",
                               "--master-port", str(port),
                               *_flags(data_json, model_json, save, hf_dir, tp_flags)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    two = _metric(save, "loss")
    assert "world 4 = PP 1 x DP 2 x CP 1 x TP 2" in outs[0]
    assert all(_close(two[i], ref[i], 1e-6) for i in ref), (two, ref)
