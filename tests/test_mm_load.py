"""`--load <mm folder>`: the trainer's model initialised from a MindSpeed-MM checkpoint of any layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnitune.checkpoint.mm_load import is_mm_checkpoint, load_mm_weights
from omnitune.config.errors import ConfigError
from omnitune.convert.qwen2vl import HfToMmConfig, Qwen2VLConverter
from omnitune.models.registry import get_family
from spine_util import losses, omnitune, train_flags, write_configs


def _hf_to_mm(hf: Path, mm: Path, llm, vit, tp=1, **extra):
    Qwen2VLConverter.hf_to_mm(HfToMmConfig(mm_dir=mm, hf_config={"hf_dir": hf}, parallel_config=dict(
        llm_pp_layers=llm, vit_pp_layers=vit, tp_size=tp, **extra)))


def _blank(fam, hf: Path):
    from transformers import AutoConfig

    from omnitune.train.model import load_hf_model

    torch.manual_seed(123)
    return load_hf_model(fam, None, AutoConfig.from_pretrained(hf), init_weights=False)


@pytest.mark.parametrize("llm,vit,tp,extra", [
    ([[2]], [[2]], 1, {}),
    ([[1, 1]], [[2, 0]], 2, {}),                          # TP2 PP2, tied output_layer copy
    ([[0, 1], [1, 0]], [[2, 0], [0, 0]], 1, {}),          # VPP
    ([[2]], [[2]], 2, {"vit_tp_size": 1}),                # hetero vision TP
])
def test_model_equals_hf_for_any_layout(tiny_qwen2vl, tmp_path, llm, vit, tp, extra):
    from omnitune.train.model import load_hf_model

    fam = get_family("qwen2_vl")
    mm = tmp_path / "mm"
    _hf_to_mm(tiny_qwen2vl, mm, llm, vit, tp, **extra)
    assert is_mm_checkpoint(mm) and not is_mm_checkpoint(tiny_qwen2vl)
    model = _blank(fam, tiny_qwen2vl)
    par = load_mm_weights(mm, fam, model)
    assert par.llm_pp_layers == llm and par.vit_pp_layers == vit and par.tp_size == tp
    assert par.module_tp("vit_tp_size") == extra.get("vit_tp_size", tp)
    ref = load_hf_model(fam, str(tiny_qwen2vl)).state_dict()
    got = model.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_mm_load_refuses_a_foreign_checkpoint(tiny_qwen2vl, tmp_path):
    fam = get_family("qwen2_vl")
    mm = tmp_path / "mm"
    _hf_to_mm(tiny_qwen2vl, mm, [[2]], [[2]])
    model = _blank(fam, tiny_qwen2vl)
    model.config.text_config.num_hidden_layers = 3  # a config.json that does not match the folder
    with pytest.raises(ConfigError, match=r"llm_pp_layers.*sums to 2.*3 LLM layers"):
        load_mm_weights(mm, fam, model)


@pytest.mark.slow
def test_training_from_mm_folder_starts_at_the_hf_loss(tiny_qwen2vl, tmp_path):
    """Seed flow: LOAD_PATH=<mm folder> (TP2 PP2 here); the first loss equals training from the HF folder."""
    mm = tmp_path / "mm"
    _hf_to_mm(tiny_qwen2vl, mm, [[1, 1]], [[2, 0]], tp=2)
    data_json, model_json = write_configs(tmp_path / "cfg", tiny_qwen2vl)
    first = {}
    for name, load in (("hf", tiny_qwen2vl), ("mm", mm)):
        save = tmp_path / f"save_{name}"
        r = omnitune(["train", *train_flags(data_json, model_json, iters=1, save=save, load=load, gbs=2)])
        first[name] = losses(save)[1]
        if name == "mm":
            assert "load       : mm" in r.stdout, r.stdout
    assert first["mm"] == first["hf"], first


@pytest.mark.parametrize("family,conv", [
    ("qwen3_vl_moe", ["Qwen3VLConverter", "hf_to_dcp", "--hf_dir", "{hf}", "--dcp_dir", "{out}"]),
    ("qwen3_omni_moe", ["ExpertMergeDcpConverter", "hf_to_dcp", "--hf_dir", "{hf}", "--save_dir", "{out}"]),
])
def test_model_from_mindspeed_dcp_equals_hf(tiny_model_dir, tmp_path, family, conv):
    """Seed flows: LOAD_PATH=<hf_to_dcp output> (Qwen3-VL meta init, Qwen3-Omni ExpertMerge)."""
    from transformers import AutoConfig

    from omnitune.checkpoint.mm_load import is_dcp_release
    from omnitune.cli.mm_convert import main as mm_convert
    from omnitune.train.model import load_hf_model

    hf, out = tiny_model_dir(family), tmp_path / "convert_path"
    assert mm_convert([a.format(hf=hf, out=out) for a in conv]) == 0
    assert is_dcp_release(out) and not is_mm_checkpoint(out)
    fam = get_family(family)
    ref = load_hf_model(fam, str(hf)).state_dict()
    cfg = AutoConfig.from_pretrained(hf)
    model = load_hf_model(fam, None, getattr(cfg, "thinker_config", cfg), init_weights=False)
    load_mm_weights(out, fam, model)
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
