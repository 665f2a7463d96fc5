"""Recompute (model.json recompute_granularity / recompute_method / recompute_num_layers) and
activation offload: same loss and gradients as without, the layers really are recomputed /
offloaded, for every family. (Under 2-rank FSDP2 they are checked in test_loss_types.)"""
from __future__ import annotations

import copy

import pytest
import torch

from omnitune.config.errors import ConfigError
from omnitune.config.model import ModelJson, unsupported_settings
from omnitune.models.registry import get_family
from omnitune.train.model import TrainModel

IMG, VSTART, VEND = 151655, 151652, 151653
MODULES = ("image_encoder.vision_encoder", "image_encoder.vision_projector", "text_decoder")


def image_batch(seed: int = 0) -> dict:
    """Two samples, one 56x56 image (grid 1x4x4 -> 4 image tokens) in the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 5000, (2, 16), generator=g)
    ids[0, 2], ids[0, 3:7], ids[0, 7] = VSTART, IMG, VEND
    labels = ids.clone()
    labels[:, :9] = -100
    mm = (ids == IMG).int()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "mm_token_type_ids": mm,
            "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]])}


def tiny_hf(seed: int = 0):
    fam = get_family("qwen2_vl")
    torch.manual_seed(seed)
    hf = fam.model_class()(fam.tiny_config()).float()
    hf.config.use_cache = False
    return fam, hf


def model_json(**per_module) -> ModelJson:
    enc = {k.split(".")[1]: v for k, v in per_module.items() if k.startswith("image_encoder.")}
    d = {"model_id": "qwen2vl"}
    if enc:
        d["image_encoder"] = enc
    if "text_decoder" in per_module:
        d["text_decoder"] = per_module["text_decoder"]
    return ModelJson.model_validate(d)


def run(tm: TrainModel, batch: dict) -> tuple[float, dict]:
    loss, n, aux = tm(batch)
    (loss / n + aux).backward()
    return loss.item(), {k: p.grad.clone() for k, p in tm.hf.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-6):
    assert abs(a[0] - b[0]) <= tol * abs(b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k in b[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


def count_calls(layers) -> list[list[int]]:
    """Forward calls of each layer's first child module (runs again when the layer is recomputed)."""
    counts = []
    for layer in layers:
        c = [0]
        first = next(layer.children())
        first.register_forward_hook(lambda *a, c=c: c.__setitem__(0, c[0] + 1))
        counts.append(c)
    return counts


def test_module_layers_default_from_module_groups():
    fam, hf = tiny_hf()
    layers = fam.module_layers(hf)
    assert set(layers) == set(MODULES)
    assert layers["image_encoder.vision_encoder"] == list(hf.model.visual.blocks)
    assert layers["image_encoder.vision_projector"] == [hf.model.visual.merger]
    assert layers["text_decoder"] == list(hf.model.language_model.layers)


FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def test_recompute_on_off_same_loss_and_grads_and_layers_rerun():
    fam, hf = tiny_hf()
    batch = image_batch()
    ref = run(TrainModel(copy.deepcopy(hf), fam, model_json()), batch)

    tm = TrainModel(copy.deepcopy(hf), fam, model_json(**{m: FULL for m in MODULES}))
    assert tm.settings_report["text_decoder"]["recompute"] == 2
    assert tm.settings_report["image_encoder.vision_encoder"]["recompute"] == 2
    layers = fam.module_layers(tm.hf)
    calls = {m: count_calls(layers[m]) for m in ("image_encoder.vision_encoder", "text_decoder")}
    got = run(tm, batch)
    assert_same(got, ref)
    # every layer's forward ran twice: once in forward, once recomputed in backward
    assert all(c[0] == 2 for cs in calls.values() for c in cs), calls


def test_recompute_block_only_first_layers():
    fam, hf = tiny_hf()
    batch = image_batch()
    ref = run(TrainModel(copy.deepcopy(hf), fam, model_json()), batch)
    block = {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}
    tm = TrainModel(copy.deepcopy(hf), fam, model_json(text_decoder=block))
    calls = count_calls(fam.module_layers(tm.hf)["text_decoder"])
    got = run(tm, batch)
    assert_same(got, ref)
    assert [c[0] for c in calls] == [2, 1]


def test_activation_offload_on_off_same_and_moves_activations():
    from omnitune.ops.recompute import offload_to_host

    fam, hf = tiny_hf()
    batch = image_batch()
    ref = run(TrainModel(copy.deepcopy(hf), fam, model_json()), batch)
    off = {"activation_offload": True}
    for extra in ({}, FULL):
        tm = TrainModel(copy.deepcopy(hf), fam, model_json(**{m: {**off, **extra} for m in MODULES}))
        # on CPU the host *is* the device; force a copy so the pack/unpack round trip is exercised
        tm.offload_stats["force"] = True
        got = run(tm, batch)
        assert_same(got, ref)
        # without recompute every activation the layers save goes to the host; with recompute the
        # checkpoint inputs only: one hidden-states tensor per layer (2 vision blocks, merger, 2 decoder layers)
        if extra:
            assert tm.offload_stats["packed"] == 5, tm.offload_stats
        else:
            assert tm.offload_stats["packed"] > 100, tm.offload_stats
    # parameters are never copied
    w = torch.nn.Parameter(torch.randn(4, 4))
    stats = {"force": True}
    with offload_to_host(stats):
        (torch.randn(3, 4, requires_grad=True) @ w).sum().backward()
    assert stats["packed"] == 1  # the input activation only


@pytest.mark.parametrize("setting, expect", [
    ({"recompute_granularity": "selective"}, "selective"),
    ({"recompute_method": "uniform"}, "need text_decoder.recompute_granularity 'full'"),
    ({"recompute_granularity": "full", "recompute_method": "block"}, "needs text_decoder.recompute_num_layers"),
    ({"recompute_granularity": "full", "recompute_num_layers": 0}, "must be >= 1"),
])
def test_bad_recompute_settings_refused(setting, expect):
    problems = unsupported_settings(model_json(text_decoder=setting))
    assert any(expect in p for p in problems), problems


def test_settings_on_module_without_layers_or_attention_fail_clearly():
    fam, hf = tiny_hf()
    with pytest.raises(ConfigError, match="vision_projector.attn_implementation: .* has no attention"):
        TrainModel(hf, fam, model_json(**{"image_encoder.vision_projector": {"attn_implementation": "sdpa"}}))
    with pytest.raises(ConfigError, match="use_npu_fused_moe: text_decoder of qwen2_vl has no MoE experts"):
        TrainModel(hf, fam, model_json(text_decoder={"use_npu_fused_moe": True}))


FAMILY_NAMES = ["qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_recompute_offload_attention_same_loss_and_grads(name):
    """Each family's module_layers (the default from its module groups) and the settings of every
    model.json module: recompute + offload + eager attention give the plain loss and grads (1e-6)."""
    from omnitune.ops.attention import submodels

    fam = get_family(name)
    torch.manual_seed(0)
    hf = fam.model_class()(fam.tiny_config()).float()
    hf.config.use_cache = False
    layers = fam.module_layers(hf)
    groups = [g.name for g in fam.module_groups()]
    assert set(layers) == set(groups) and all(layers[g] for g in groups)
    assert not any(isinstance(l, (torch.nn.ModuleList, torch.nn.ModuleDict)) for ls in layers.values() for l in ls)
    roots = fam.module_roots(hf)
    settings = {}
    for g in groups:
        s = {**FULL, "activation_offload": True}
        if submodels(roots[g]):
            s["attn_implementation"] = "eager"
        settings[g] = s
    g_ = torch.Generator().manual_seed(3)
    ids = torch.randint(100, 5000, (2, 14), generator=g_)
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    base = {"model_id": fam.model_ids[0]}
    ref = run(TrainModel(copy.deepcopy(hf), fam, ModelJson.model_validate({**base, "text_decoder": {"attn_implementation": "eager"}})), batch)
    cfg = {**base}
    for g, s in settings.items():
        top, _, sub = g.partition(".")
        if sub:
            cfg.setdefault(top, {})[sub] = s
        else:
            cfg[top] = s
    tm = TrainModel(copy.deepcopy(hf), fam, ModelJson.model_validate(cfg))
    tm.offload_stats["force"] = True
    got = run(tm, batch)
    assert_same(got, ref)
    assert all(tm.settings_report[g]["recompute"] == len(layers[g]) for g in groups)
    assert tm.offload_stats["packed"] >= len(layers["text_decoder"])
