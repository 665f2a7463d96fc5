"""Pipeline parallelism through the real CLI (issue 13), tiny models on gloo.

Per family, each layout (PP2, PP2 + VPP2 interleaved, PP2 x DP2, PP2 x TP2) trains 10 iterations of
the same global batches as one process (global batch 4, micro-batch 1) and logs the same per-step
losses (1e-4 relative) and step-1 gradient norm (1e-5); the data mix images of different sizes,
videos, text-only samples (and audio for Omni). Stages come from model.json: vision [2, 0] + text
[1, 1], so the vision tower, the embedding and the first text layer sit on stage 0; with VPP
[[0, 1], [1, 0]]: stage 0 the encoders + embedding, stages 1 and 2 one text layer each, stage 3 the
head, so for Qwen3-VL the DeepStack features cross two stage boundaries.
Also: a stage with nothing to train (text decoder frozen) is refused without
--enable-dummy-optimizer and trains with it, its weights unchanged; a PP2 checkpoint resumes at PP1
(and a PP1 one at PP2) with the uninterrupted run's losses.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spine_util import losses, omnitune
# the scale-out tests' flags, tolerance and one-process reference run (a module-scoped fixture: this
# file's own instance, on its own xdist worker)
from test_scaleout import _close, _flags, check_layouts, family_runs  # noqa: F401

pytestmark = pytest.mark.slow

ITERS = 10
PP = ["--pipeline-model-parallel-size", "2"]
LAYOUTS = {   # name -> (processes, flags, text_decoder.pipeline_num_layers)
    "pp2": (2, PP, [1, 1]),
    "pp2_vpp2": (2, [*PP, "--virtual-pipeline-model-parallel-size", "2"], [[0, 1], [1, 0]]),
    "pp2_dp2": (4, PP, [1, 1]),
    "pp2_tp2": (4, [*PP, "--tensor-model-parallel-size", "2"], [1, 1]),
}


def _model_json(model_json: Path, out: Path, text_layers, vision=None, freeze_text=False) -> Path:
    cfg = json.loads(model_json.read_text())
    cfg["text_decoder"]["pipeline_num_layers"] = text_layers
    cfg["text_decoder"]["freeze"] = freeze_text
    if vision is not None:
        cfg["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = vision
    out.write_text(json.dumps(cfg, indent=2))
    return out


def _layout_model_json(lay, model_json, root):
    text = LAYOUTS[lay][2]
    vpp = isinstance(text[0], list)
    return _model_json(model_json, root / f"model_{lay}.json", text, [[2, 0], [0, 0]] if vpp else [2, 0])


# Qwen2-VL runs every layout here; Qwen3-VL (DeepStack features crossing the boundaries) and
# Qwen2.5-Omni (audio encoder on stage 0, images + audio) every layout in test_pipeline_families.py
# (a file of their own, so make test's workers run them beside these)
CASES = [("qwen2_vl", list(LAYOUTS))]


@pytest.mark.parametrize("name,layouts", CASES, ids=[c[0] for c in CASES])
def test_pipeline_layouts_match_one_process(name, layouts, family_runs):
    check_layouts(name, layouts, family_runs, LAYOUTS, _layout_model_json, marker="stage 1 (PP rank 1")


def _resume_from(src: Path, dst: Path) -> Path:
    """A copy of the run folder ``src`` set back to its iteration-5 checkpoint."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("iter_0000010"))
    (dst / "latest_checkpointed_iteration.txt").write_text("5")
    lines = [json.loads(x) for x in (dst / "metrics.jsonl").read_text().splitlines()]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines if m.get("iteration", 0) <= 5))
    return dst


def test_pipeline_checkpoints_resume_at_other_layouts(family_runs):
    """PP2's iteration-5 checkpoint resumes in one process, and the one process's at PP2: iterations
    6..10 give the uninterrupted runs' losses (the tied embedding is stored once, by its own name)."""
    data_json, model_json, hf_dir, root, one = family_runs("qwen2_vl")
    pp2 = root / "pp2"
    mj = _model_json(model_json, root / "model_pp2.json", [1, 1], [2, 0])
    if not (pp2 / "iter_0000005").is_dir():
        omnitune(["train", "--nproc-per-node", "2", *_flags(data_json, mj, pp2, hf_dir, PP)])
    for src, nproc, flags in ((pp2, 1, []), (one, 2, PP)):
        resumed = _resume_from(src, root / f"resume_{src.name}_{nproc}")
        r = omnitune(["train", "--nproc-per-node", str(nproc), *_flags(data_json, mj, resumed, resumed, flags)])
        assert "at iteration 5" in r.stdout and "resharded to" in r.stdout, r.stdout[-2000:]
        ref, got = losses(src, "loss"), losses(resumed, "loss")
        for i in range(6, ITERS + 1):
            assert _close(got[i], ref[i], 1e-5), (src.name, nproc, i, got[i], ref[i])


def test_stage_without_trainable_parameters_needs_the_dummy_optimizer(family_runs):
    """Text decoder frozen, layout [1, 1]: stage 1 (a text layer, the norm and the tied lm_head) has
    nothing to train. Refused before launch naming --enable-dummy-optimizer; with it the vision
    tower trains and every text-decoder weight stays bit-identical."""
    import torch

    from omnitune.cli.main import main as cli_main
    from test_family_e2e import _tensors

    data_json, model_json, hf_dir, root, _ = family_runs("qwen2_vl")
    mj = _model_json(model_json, root / "model_frozen_text.json", [1, 1], [2, 0], freeze_text=True)
    save = root / "dummy"
    flags = [*_flags(data_json, mj, save, hf_dir, PP), "--train-iters", "3"]
    r = omnitune(["train", "--nproc-per-node", "2", *flags], check=False)
    assert r.returncode != 0
    assert "pipeline stage(s) 1 hold no trainable parameter" in r.stderr and "--enable-dummy-optimizer" in r.stderr
    omnitune(["train", "--nproc-per-node", "2", *flags, "--enable-dummy-optimizer"])
    assert cli_main(["export", "--load", str(save), "--save", str(root / "dummy_hf")]) == 0
    before, after = _tensors(hf_dir), _tensors(root / "dummy_hf")
    vision = [k for k in before if k.startswith("visual.") or ".visual." in k]
    text = [k for k in before if k not in vision]   # embedding, layers, norm (lm_head: tied)
    assert text and vision and set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in text)
    assert any(not torch.equal(before[k], after[k]) for k in vision)


def test_mm_folder_of_a_pipeline_layout_loads_into_the_pipeline_run(family_runs):
    """mm-convert hf_to_mm with llm_pp_layers [[1, 1]] / vit_pp_layers [[2, 0]] (the layout of the
    run) -> --load of that folder at PP2: the first loss equals the run started from the HF folder."""
    from omnitune.cli.mm_convert import main as mm_convert

    data_json, model_json, hf_dir, root, _ = family_runs("qwen2_vl")
    mm = root / "mm_pp2"
    assert mm_convert(["Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir",
                       str(hf_dir), "--cfg.parallel_config.llm_pp_layers", "[[1,1]]",
                       "--cfg.parallel_config.vit_pp_layers", "[[2,0]]", "--cfg.parallel_config.tp_size", "1"]) == 0
    assert (mm / "release" / "mp_rank_00_001").is_dir()
    mj = _model_json(model_json, root / "model_pp2.json", [1, 1], [2, 0])
    pp2 = root / "pp2"
    if not (pp2 / "metrics.jsonl").is_file():
        omnitune(["train", "--nproc-per-node", "2", *_flags(data_json, mj, pp2, hf_dir, PP)])
    save = root / "from_mm"
    omnitune(["train", "--nproc-per-node", "2", *_flags(data_json, mj, save, mm, PP), "--train-iters", "1"])
    assert _close(losses(save, "loss")[1], losses(pp2, "loss")[1], 1e-6)

