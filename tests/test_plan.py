"""make_plan: the HF folder's config decides the family; model.json's model_id must name it."""
from __future__ import annotations

import json

import pytest

from omnitune.config.errors import ConfigError
from omnitune.train.trainer import make_plan
from spine_util import write_configs


def _plan(tmp_path, hf_dir, model_id, template="qwen2vl"):
    data_json, model_json = write_configs(tmp_path, hf_dir)
    d = json.loads(data_json.read_text())
    d["dataset_param"]["basic_parameters"]["template"] = template   # the folder's family's
    data_json.write_text(json.dumps(d))
    m = json.loads(model_json.read_text())
    m["model_id"] = model_id
    model_json.write_text(json.dumps(m))
    return make_plan(["--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "1"])[0]


def test_model_id_must_name_the_folders_family(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model_id 'qwen2vl' expects a Qwen2VLConfig but .* is "
                                          r"Qwen2_5_VLConfig \(model_id 'qwen2_5vl'\)"):
        _plan(tmp_path, tiny_model_dir("qwen2_5_vl"), "qwen2vl")


def test_full_omni_folder_and_mindspeed_mm_legacy_model_id(tmp_path, tiny_model_dir):
    omni = tiny_model_dir("qwen2_5_omni")
    for model_id in ("qwen2_5_omni", "qwen2_5vl"):  # the seeds' model_7b.json says qwen2_5vl
        plan = _plan(tmp_path / model_id, omni, model_id, "qwen2_omni")
        assert plan.family.name == "qwen2_5_omni"
        assert (plan.load_kind, plan.load_path) == ("hf", str(omni))
    with pytest.raises(ConfigError, match="model_id 'qwen3_omni_moe' expects"):
        _plan(tmp_path / "wrong", omni, "qwen3_omni_moe", "qwen2_omni")
