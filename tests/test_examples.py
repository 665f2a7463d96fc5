"""examples/: every seed-style script's flags parse (dry run against tiny fixtures of its family), and
every example JSON loads with nothing refused and agrees with the real model's published config sizes."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from omnitune.config.data import load_data_config, unsupported_features
from omnitune.config.model import STRUCTURE_KEYS, check_against_hf_config, load_model_json, unsupported_settings
from omnitune.data import demo_data_dir
from omnitune.models.registry import family_for_model_id

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# (folder, size tag) -> (data json, model json, script)
CASES = {
    ("qwen2vl", "2b"): ("data_2b.json", "model_2b.json", "finetune_qwen2vl_2b.sh"),
    ("qwen2vl", "7b"): ("data_7b.json", "model_7b.json", "finetune_qwen2vl_7b.sh"),
    ("qwen2vl", "72b"): ("data_72b_dpo.json", "model_72b.json", "finetune_qwen2vl_72b_dpo.sh"),   # DPO + LoRA
    ("qwen2.5vl", "3b"): ("data_3b.json", "model_3b.json", "finetune_qwen2_5_vl_3b.sh"),
    ("qwen2.5vl", "7b"): ("data_7b.json", "model_7b.json", "finetune_qwen2_5_vl_7b.sh"),
    ("qwen2.5omni", "7b"): ("data_7b.json", "model_7b.json", "finetune_qwen2_5_omni_7b.sh"),
    ("qwen2.5omni", "7b-hetero"): ("data_7b.json", "model_7b.json", "finetune_qwen2_5_omni_7b_hetero.sh"),
    ("qwen3vl", "8B"): ("data_8B.json", "model_8B.json", "finetune_qwen3vl_8B.sh"),
    ("qwen3vl", "30B"): ("data_30B.json", "model_30B.json", "finetune_qwen3vl_30B.sh"),
    ("qwen3omni", "30B-A3B"): ("data.json", "model.json", "finetune_qwen3omni.sh"),
}


def _text(**kw):
    return dict(max_position_embeddings=32768, **kw)


def real_config(folder: str, size: str):
    """The published config.json sizes of the real checkpoints (structure only)."""
    import transformers as T

    qwen2vit = dict(depth=32, embed_dim=1280, num_heads=16, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3)
    vit25 = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31])
    vit3 = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    audio = dict(encoder_layers=32, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120,
                 num_mel_bins=128, max_source_positions=1500, n_window=100)
    if folder == "qwen2vl":
        t = {"2b": _text(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
             "7b": _text(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
             "72b": _text(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=152064)}[size]
        return T.Qwen2VLConfig(text_config=t, vision_config=dict(qwen2vit, hidden_size=t["hidden_size"]))
    if folder == "qwen2.5vl":
        t = {"3b": _text(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936),
             "7b": _text(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064)}[size]
        return T.Qwen2_5_VLConfig(text_config=t, vision_config=dict(vit25, out_hidden_size=t["hidden_size"]))
    if folder == "qwen2.5omni":
        t = _text(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064)
        return T.Qwen2_5OmniThinkerConfig(text_config=t, vision_config=dict(vit25, out_hidden_size=3584),
                                          audio_config=dict(audio, output_dim=3584))
    if folder == "qwen3vl" and size == "8B":
        t = _text(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936)
        return T.Qwen3VLConfig(text_config=t, vision_config=dict(vit3, out_hidden_size=4096))
    if folder == "qwen3vl":
        t = _text(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                  moe_intermediate_size=768)
        return T.Qwen3VLMoeConfig(text_config=t, vision_config=dict(vit3, out_hidden_size=2048))
    t = _text(hidden_size=2048, intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
              num_key_value_heads=4, head_dim=128, vocab_size=152064, num_experts=128, num_experts_per_tok=8,
              moe_intermediate_size=768)
    return T.Qwen3OmniMoeThinkerConfig(text_config=t, vision_config=dict(vit3, out_hidden_size=2048),
                                       audio_config=dict(audio, output_dim=2048))


@pytest.mark.parametrize("folder,size", list(CASES))
def test_example_jsons_load_and_match_real_configs(folder, size):
    data_name, model_name, _ = CASES[folder, size]
    data = load_data_config(EXAMPLES / folder / data_name)
    assert unsupported_features(data) == []
    model = load_model_json(EXAMPLES / folder / model_name)
    assert unsupported_settings(model) == []
    family = family_for_model_id(model.model_id)
    config = real_config(folder, size)
    check_against_hf_config(model, family, config, model_name)
    # the check is live: a wrong layer count in the example is refused
    wrong = model.model_copy(deep=True)
    wrong.text_decoder.__pydantic_extra__["num_layers"] = 999
    with pytest.raises(Exception, match="num_layers"):
        check_against_hf_config(wrong, family, config, model_name)


def _tiny_configs(folder: str, size: str, out: Path, hf_dir: Path) -> tuple[Path, Path]:
    """The example's data.json / model.json pointed at the tiny fixture and the bundled demo data, with
    model.json structure sizes removed (they describe the real model, not the tiny one)."""
    data_name, model_name, _ = CASES[folder, size]
    data = json.loads((EXAMPLES / folder / data_name).read_text())
    data["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = str(hf_dir)
    b = data["dataset_param"]["basic_parameters"]
    b["dataset_dir"], b["dataset"], b["cache_dir"] = str(demo_data_dir()), "demo.json", str(out / "cache")
    model = json.loads((EXAMPLES / folder / model_name).read_text())

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if not (k in STRUCTURE_KEYS - {"model_id"} or k == "pipeline_num_layers")}
        return node

    model = {k: strip(v) if k in ("image_encoder", "audio_encoder", "text_decoder") else v for k, v in model.items()}
    model["init_from_hf_path"] = str(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(data))
    (out / "model.json").write_text(json.dumps(model))
    return out / "data.json", out / "model.json"


# scripts with a parallel layout: (world size, tiny-model text overrides, lines --dry-run must print)
LAYOUT_SCRIPTS = {
    ("qwen2vl", "7b"): (4, {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4}, [   # PP=4: 4 text layers
        "world 4 = PP 4 x DP 1 x CP 1 x TP 1",
        "pipeline   : 4 stages, 1F1B, 96 micro-batches per step",
        "stage 0 (PP rank 0, chunk 0): vision/audio encoders + embedding, text layers 0-0",
        "stage 3 (PP rank 3, chunk 0): text layers 3-3, norm + lm_head + loss"]),
    ("qwen2.5omni", "7b-hetero"): (4, {"num_key_value_heads": 4}, [
        "world 4 = PP 1 x DP 1 x CP 1 x TP 4",
        "hetero     : image_encoder, audio_encoder data-parallel over each TP group (4 ranks"]),
}


@pytest.mark.parametrize("folder,size", list(CASES))
def test_example_script_flags_parse(folder, size, tmp_path, tiny_model_dir):
    """Run the script with a stand-in `torchrun` that starts omnitune.train --dry-run in-process."""
    data_name, model_name, script = CASES[folder, size]
    family = family_for_model_id(json.loads((EXAMPLES / folder / model_name).read_text())["model_id"])
    world, overrides, expect = LAYOUT_SCRIPTS.get((folder, size), (1, None, ["world 1 = PP 1 x DP 1 x CP 1 x TP 1"]))
    if overrides:   # TP 4 needs 4 key/value heads, PP 4 four text layers
        from omnitune.models.tiny import build_tiny_model
        hf_dir = build_tiny_model(family.name, tmp_path / "tiny", text_overrides=overrides)
    else:
        hf_dir = tiny_model_dir(family.name)
    data_json, model_json = _tiny_configs(folder, size, tmp_path / "cfg", hf_dir)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "torchrun"
    fake.write_text(f"#!/bin/sh\nwhile [ \"$1\" != \"-m\" ]; do shift; done\nshift 2\n"
                    f"exec {sys.executable} -m omnitune.train \"$@\" --dry-run\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", NPUS_PER_NODE=str(world), WORLD_SIZE=str(world),
               MM_DATA=str(data_json), MM_MODEL=str(model_json), LOAD_PATH=str(hf_dir),
               SAVE_PATH=str(tmp_path / "save"))
    r = subprocess.run(["bash", str(EXAMPLES / folder / script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in expect:
        assert line in r.stdout, (line, r.stdout)
    assert f"model      : {family.name}" in r.stdout
    assert "ignored    : " in r.stdout and "--use-flash-attn" in r.stdout
    assert not (tmp_path / "save").exists()
