"""examples/qwen2vl: the seed-style scripts' flags parse, and the example JSONs agree with the real
Qwen2-VL-2B/7B configs."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from omnitune.config.data import load_data_config, unsupported_features
from omnitune.config.model import check_against_hf_config, load_model_json, unsupported_settings
from omnitune.models.registry import get_family
from spine_util import write_configs

EX = Path(__file__).resolve().parents[1] / "examples" / "qwen2vl"

# published Qwen2-VL-*-Instruct config.json sizes
REAL = {
    "2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936)),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064)),
}


@pytest.mark.parametrize("size", ["2b", "7b"])
def test_example_jsons_load_and_match_real_configs(size):
    from transformers import Qwen2VLConfig

    data = load_data_config(EX / f"data_{size}.json")
    assert unsupported_features(data) == []
    model = load_model_json(EX / f"model_{size}.json")
    assert unsupported_settings(model) == []
    t = REAL[size]["text"]
    cfg = Qwen2VLConfig(text_config=t, vision_config=dict(depth=32, embed_dim=1280, hidden_size=t["hidden_size"],
                                                          num_heads=16, patch_size=14, spatial_merge_size=2,
                                                          temporal_patch_size=2, in_channels=3))
    check_against_hf_config(model, get_family("qwen2_vl"), cfg, f"model_{size}.json")


@pytest.mark.parametrize("script", ["finetune_qwen2vl_2b.sh", "finetune_qwen2vl_7b.sh"])
def test_example_script_flags_parse(script, tmp_path, tiny_qwen2vl):
    """Run the script with a stand-in `torchrun` that starts omnitune.train --dry-run in-process."""
    data_json, model_json = write_configs(tmp_path / "cfg", tiny_qwen2vl)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "torchrun"
    fake.write_text(f"#!/bin/sh\nwhile [ \"$1\" != \"-m\" ]; do shift; done\nshift 2\n"
                    f"exec {sys.executable} -m omnitune.train \"$@\" --dry-run\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", NPUS_PER_NODE="1", MM_DATA=str(data_json),
               MM_MODEL=str(model_json), LOAD_PATH=str(tiny_qwen2vl), SAVE_PATH=str(tmp_path / "save"))
    r = subprocess.run(["bash", str(EX / script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FSDP2 over 1 rank(s)" in r.stdout
    assert "ignored    : " in r.stdout and "--use-flash-attn" in r.stdout
    assert not (tmp_path / "save").exists()
