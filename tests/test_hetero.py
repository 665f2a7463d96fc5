"""--hetero-parallel (seed Qwen2.5-Omni): the LLM TP2, the vision and audio encoders data-parallel over
the TP group (model.json image_encoder / audio_encoder tp 1), through the real CLI on gloo: 10 steps
give the one-process run's per-step losses (1e-4 relative) and step-1 gradient norm (1e-5), on
batches with images, videos, audio and text-only samples (micro-batch 2: each TP rank encodes its
share of the items; a rank whose share is empty encodes a dummy). The reference runs micro-batch 2
too: the default loss is a token mean per micro-batch, so the micro-batch size is part of it.

Its checkpoint resumes in one process (layout-free DCP). The refusals (sizes in model.json against the flags) are in test_layout.py; the seed-style script
examples/qwen2.5omni/finetune_qwen2_5_omni_7b_hetero.sh is parsed in test_examples.py."""
from __future__ import annotations

import json

import pytest

from omnitune.parallel.hetero import _shares
from spine_util import omnitune
from test_family_e2e import _configs
from test_pipeline import _resume_from
from test_scaleout import _close, _flags, _metric, check_layouts

pytestmark = pytest.mark.slow

MBS2 = ["--micro-batch-size", "2"]   # a multiple of TP (the seed's rule); the loss is a mean per micro-batch
LAYOUTS = {"hetero_tp2": (2, ["--tensor-model-parallel-size", "2", "--hetero-parallel", *MBS2])}


def _hetero_model_json(layout, model_json, root):
    cfg = json.loads(model_json.read_text())
    for section in ("image_encoder", "audio_encoder"):
        cfg.setdefault(section, {}).update(tp=1, pp=1, cp=1)
    out = root / f"model_{layout}.json"
    out.write_text(json.dumps(cfg, indent=2))
    return out


def test_shares_cover_every_item_once():
    for n in range(0, 7):
        for size in (1, 2, 4):
            s = _shares(n, size)
            assert [i for lo, hi in s for i in range(lo, hi)] == list(range(n))
            assert max(hi - lo for lo, hi in s) - min(hi - lo for lo, hi in s) <= 1


def test_hetero_tp2_matches_one_process(tiny_model_dir, tmp_path):
    from omnitune.models.registry import get_family

    hf_dir = tiny_model_dir("qwen2_5_omni")
    data_json, model_json, _, _ = _configs(get_family("qwen2_5_omni"), hf_dir, tmp_path)
    one = tmp_path / "one_mbs2"   # the same micro-batches in one process (2 accumulated per step)
    omnitune(["train", *_flags(data_json, model_json, one, hf_dir, MBS2)])
    check_layouts("qwen2_5_omni", list(LAYOUTS), lambda name: (data_json, model_json, hf_dir, tmp_path, one),
                  table=LAYOUTS, model_json_for=_hetero_model_json,
                  marker=[f"hetero     : {section} ({path}): not TP-split, FSDP2 over dp_cp_tp (2 ranks)"
                          for section, path in (("image_encoder", "model.visual"), ("audio_encoder", "model.audio_tower"))])
    # its iteration-5 checkpoint (encoder shards on the DP x TP mesh) resumes in one process
    resumed = _resume_from(tmp_path / "hetero_tp2", tmp_path / "resume_one")
    r = omnitune(["train", *_flags(data_json, model_json, resumed, resumed, MBS2)])
    assert "at iteration 5" in r.stdout and "resharded to" in r.stdout, r.stdout[-2000:]
    got, ref = _metric(resumed, "loss"), _metric(one, "loss")
    assert all(_close(got[i], ref[i], 1e-4) for i in range(6, 11)), (got, ref)
