"""Per family: our TrainModel (family forward_hidden + our loss) equals plain HF ``model(**batch,
labels=...)`` on batches the real processor made with all of the family's modalities; a text-only
batch runs every encoder once on a masked dummy (zero, not missing, gradients)."""
from __future__ import annotations

import copy

import pytest
import torch

from omnitune.models.registry import FAMILIES, get_family
from omnitune.train.model import TrainModel, load_hf_model

ALL = sorted(FAMILIES)
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")


def _hf_loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, labels=batch["labels"]).loss


def _ours(model, fam, batch):
    loss_sum, n, aux = TrainModel(model, fam)(batch)
    return loss_sum / n, aux


CASES = [(n, False) for n in ALL] + [(n, True) for n in OMNI]


@pytest.mark.parametrize("name,audio_in_video", CASES,
                         ids=[n + ("-audio_in_video" if v else "") for n, v in CASES])
def test_loss_equals_plain_hf_with_all_modalities(name, audio_in_video, tiny_model_dir, family_batch):
    fam = get_family(name)
    batch = family_batch(name, use_audio_in_video=audio_in_video)
    keys = set(batch)
    assert {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"} <= keys
    if name in OMNI:
        assert {"input_features", "feature_attention_mask", "video_second_per_grid"} <= keys
    else:
        assert "mm_token_type_ids" in keys
    if name == "qwen2_5_vl":
        assert "second_per_grid_ts" in keys
    assert (batch["attention_mask"] == 0).any()     # padded: samples of different lengths
    model = load_hf_model(fam, str(tiny_model_dir(name))).eval()
    with torch.no_grad():
        ref = _hf_loss(model, batch)
        ours, aux = _ours(copy.deepcopy(model), fam, batch)
    assert torch.isfinite(ref) and aux.item() == 0.0
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item()), (ours.item(), ref.item())
    if audio_in_video:   # the flag reaches the positions: without it the loss differs
        without = {k: v for k, v in batch.items() if k != "use_audio_in_video"}
        with torch.no_grad():
            h1, _ = fam.forward_hidden(model, batch)
            h0, _ = fam.forward_hidden(model, without)
        assert (h1 - h0).abs().max() > 1e-3 * h1.abs().max()


def test_positions_depend_on_video_timing(tiny_model_dir, family_batch):
    """second_per_grid_ts (Qwen2.5-VL) / video_second_per_grid (Omni) reach the rope positions:
    changing them changes both losses the same way (guards against a dropped batch key)."""
    for name, key in (("qwen2_5_vl", "second_per_grid_ts"), ("qwen2_5_omni", "video_second_per_grid")):
        fam = get_family(name)
        model = load_hf_model(fam, str(tiny_model_dir(name))).eval()
        batch = family_batch(name)
        slow = dict(batch, **{key: batch[key] * 7})
        with torch.no_grad():
            b, _ = _ours(model, fam, slow)
            assert abs(b.item() - _hf_loss(model, slow).item()) <= 1e-5 * abs(b.item())
            h1, _ = fam.forward_hidden(model, batch)
            h0, _ = fam.forward_hidden(model, slow)
        assert (h1 - h0).abs().max() > 1e-3 * h1.abs().max(), name


@pytest.mark.parametrize("name", ALL)
def test_text_only_batch_runs_encoders_once_on_masked_dummy(name, tiny_model_dir, family_batch):
    fam = get_family(name)
    model = load_hf_model(fam, str(tiny_model_dir(name)))
    towers = {"vision": fam.vision_tower(model)}
    if name in OMNI:
        towers["audio"] = fam.audio_tower(model)
    calls = {k: 0 for k in towers}
    for k, t in towers.items():
        t.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
    batch = family_batch(name, modalities=())
    assert "pixel_values" not in batch and "input_features" not in batch
    loss_sum, n, aux = TrainModel(model, fam)(batch)
    assert all(c == 1 for c in calls.values()), calls
    assert aux.item() == 0.0
    with torch.no_grad():
        ref = _hf_loss(model, batch)
    assert abs((loss_sum / n).item() - ref.item()) <= 1e-5 * abs(ref.item())
    (loss_sum / n + aux).backward()
    for k, t in towers.items():
        for pname, p in t.named_parameters():
            if name == "qwen2_5_omni" and pname == "audio_bos_eos_token.weight":
                assert p.grad is None      # never used by the HF forward, with or without audio
                continue
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, (k, pname)
    # the decoder did train
    assert torch.count_nonzero(fam.lm_head(model).weight.grad) > 0


@pytest.mark.parametrize("name", OMNI)
def test_omni_loads_thinker_only_from_full_folder(name, tiny_model_dir):
    """The trainable model is the thinker class, built alone; its tensors are the folder's thinker.*."""
    from safetensors import safe_open

    fam = get_family(name)
    d = tiny_model_dir(name)
    model = load_hf_model(fam, str(d))
    assert type(model).__name__ == fam.hf_class_name
    assert not any(n.startswith(("talker", "token2wav", "code2wav")) for n, _ in model.named_modules())
    full = fam.folder_class().from_pretrained(d)
    ours, ref = model.state_dict(), full.thinker.state_dict()
    assert sorted(ours) == sorted(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert any(k.startswith("thinker.") for k in f.keys())


def test_qwen3_omni_folder_with_audio_output_disabled(tiny_model_dir, family_batch, tmp_path):
    """The Qwen3-Omni seed sets enable_audio_output=false in config.json (talker weights stay on
    disk): the thinker still loads alone with the same tensors, and plain transformers loads the
    folder (without building the talker) with the same thinker logits."""
    import json
    import shutil

    fam = get_family("qwen3_omni_moe")
    src = tiny_model_dir("qwen3_omni_moe")
    d = tmp_path / "no_audio_out"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["enable_audio_output"] is True
    cfg["enable_audio_output"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    ours = load_hf_model(fam, str(d)).eval()
    ref = load_hf_model(fam, str(src))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    plain = fam.folder_class().from_pretrained(d)
    assert not hasattr(plain, "talker")
    batch = {k: v for k, v in family_batch("qwen3_omni_moe").items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, plain.thinker.eval()(**batch).logits)
