"""A tied-embedding model's checkpoint holds each weight once (its size = weights, or weights +
AdamW moments), and checkpoints written before that change (the tied weight stored under both
names) still resume and export to the same weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from spine_util import losses, omnitune, train_flags, write_configs


def _distcp_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in ckpt.glob("*.distcp"))


def _model_keys(ckpt: Path) -> list[str]:
    from omnitune.checkpoint.safe_dcp import read_metadata

    return [k for k in read_metadata(ckpt).state_dict_metadata if k.startswith("model.")]


def _write_old_format(ckpt: Path, out: Path) -> None:
    """Rewrite ``ckpt`` as the earlier code saved it: the tied lm_head stored as its own copy."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = out.parent / "flat.pt"
    dcp_to_torch_save(str(ckpt), str(flat))          # our own test file: plain reader is fine here
    state = torch.load(flat, weights_only=True)
    model = state["model"]
    assert "lm_head.weight" not in model
    model["lm_head.weight"] = model["model.language_model.embed_tokens.weight"].clone()
    dcp.save(state, checkpoint_id=str(out), no_dist=True)
    for name in ("trainer_state.json", "rng"):
        src = ckpt / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out / name)


def test_tied_checkpoint_holds_each_weight_once_and_old_checkpoints_load(tmp_path, tiny_qwen2vl):
    from safetensors import safe_open

    with safe_open(str(tiny_qwen2vl / "model.safetensors"), "pt") as f:
        weights = sum(f.get_tensor(k).numel() * 4 for k in f.keys())   # fp32 training copy
    cfg = json.loads((tiny_qwen2vl / "config.json").read_text())
    assert cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings"))
    data_json, model_json = write_configs(tmp_path / "cfg", tiny_qwen2vl)
    save = tmp_path / "save"
    omnitune(["train", *train_flags(data_json, model_json, iters=2, save=save, load=tiny_qwen2vl, mbs=2, gbs=2),
              "--save-interval", "1", "--no-progress-bar"])
    ckpt = save / "iter_0000002"
    keys = _model_keys(ckpt)
    assert "model.model.language_model.embed_tokens.weight" in keys and "model.lm_head.weight" not in keys
    size = _distcp_bytes(ckpt)
    # weights + exp_avg + exp_avg_sq, plus a little metadata per tensor (was 4 x the embedding more)
    assert 3 * weights <= size <= 3 * weights * 1.01 + 2**20, (size, weights)

    # a checkpoint in the earlier layout resumes and exports the same as the new one
    old_root = tmp_path / "old"
    old_root.mkdir()
    _write_old_format(save / "iter_0000001", old_root / "iter_0000001")
    (old_root / "latest_checkpointed_iteration.txt").write_text("1")
    assert "model.lm_head.weight" in _model_keys(old_root / "iter_0000001")
    new_root = tmp_path / "new"
    new_root.mkdir()
    shutil.copytree(save / "iter_0000001", new_root / "iter_0000001")
    (new_root / "latest_checkpointed_iteration.txt").write_text("1")
    for root in (old_root, new_root):
        omnitune(["train", *train_flags(data_json, model_json, iters=3, save=root, load=root, mbs=2, gbs=2),
                  "--no-progress-bar"])
    assert losses(old_root)[3] == losses(new_root)[3] == losses(new_root)[3]
    assert abs(losses(new_root)[2] - losses(save)[2]) < 1e-6
    exported = {}
    for root in (old_root, new_root):
        out = tmp_path / f"hf_{root.name}"
        omnitune(["export", "--load", str(root), "--save", str(out)])
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            exported[root.name] = {k: f.get_tensor(k) for k in f.keys()}
    assert exported["old"].keys() == exported["new"].keys()
    assert all(torch.equal(exported["old"][k], exported["new"][k]) for k in exported["new"])
