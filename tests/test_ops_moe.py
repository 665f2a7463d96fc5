"""Fused MoE experts (ops/moe.py) against transformers' eager experts, and the router aux loss
against transformers' own ``output_router_logits`` loss, for Qwen3-VL-MoE and Qwen3-Omni-MoE."""
from __future__ import annotations

import copy

import pytest
import torch

from omnitune.ops import moe

VOCAB = 1024


def text_cfg(**kw):
    d = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=0,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                              "mrope_interleaved": True})
    d.update(kw)
    return d


def vl_moe_config(**kw):
    from transformers import Qwen3VLMoeConfig
    return Qwen3VLMoeConfig(
        text_config=text_cfg(tie_word_embeddings=False, **kw),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=6, video_token_id=7, vision_start_token_id=3, vision_end_token_id=4)


def omni_thinker_config(**kw):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    return Qwen3OmniMoeThinkerConfig(
        text_config=text_cfg(**kw),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=64, n_window=50, n_window_infer=100, conv_chunksize=500,
                          downsample_hidden_size=16, max_source_positions=1500),
        audio_token_id=10, image_token_id=6, video_token_id=7, vision_start_token_id=3, vision_end_token_id=4)


def moe_block(family: str, **kw):
    if family == "qwen3_vl_moe":
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock as Block
        cfg = vl_moe_config(**kw).text_config
    else:
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerTextSparseMoeBlock as Block)
        cfg = omni_thinker_config(**kw).text_config
    torch.manual_seed(0)
    block = Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def run_block(block, x):
    x = x.clone().requires_grad_(True)
    y = block(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


def compare_block(family: str, force_fallback: bool, **kw):
    ref_block = moe_block(family, **kw)
    ours = copy.deepcopy(ref_block)
    assert ours.experts.config is not ref_block.experts.config
    moe.set_experts_implementation([ref_block.experts], fused=False)
    assert moe.set_experts_implementation(moe.experts_modules(ours), fused=True) == 1
    assert ours.experts.config._experts_implementation == moe.IMPL_NAME
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    ref = run_block(ref_block, x)
    old = moe.FORCE_FALLBACK
    moe.FORCE_FALLBACK = force_fallback
    try:
        got = run_block(ours, x)
    finally:
        moe.FORCE_FALLBACK = old
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")


def _assert_matches_hf(tm, ref, out, batch: dict, coef: float) -> None:
    """Our loss (+ coef x router aux) and every gradient equal the HF reference's ``out`` (already
    backpropagated); where one side has no gradient, the other has none or a zero one (an encoder
    run on a masked dummy input)."""
    loss_sum, n, aux = tm(batch)
    loss = loss_sum / n + aux
    loss.backward()
    assert abs(aux.item() - coef * out.aux_loss.item()) < 1e-6
    assert abs(loss.item() - out.loss.item()) < 1e-5, (loss.item(), out.loss.item())
    ref_grads = dict(ref.named_parameters())
    checked = 0
    for name, p in tm.hf.named_parameters():
        r = ref_grads[name].grad
        if p.grad is None or r is None:
            other = r if p.grad is None else p.grad
            assert other is None or float(other.abs().max()) == 0, name
            continue
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_omni_moe"])
@pytest.mark.parametrize("force_fallback", [False, True])
def test_fused_experts_equal_hf_eager(family, force_fallback):
    compare_block(family, force_fallback)


def test_kernel_used_where_operands_fit_and_fallback_for_odd_sizes():
    block = moe_block("qwen3_vl_moe")
    x = torch.randn(5, 64)
    assert moe.grouped_mm_kernel_ok(x, block.experts.gate_up_proj.transpose(1, 2)) == hasattr(torch, "_grouped_mm")
    odd = moe_block("qwen3_vl_moe", moe_intermediate_size=13)
    assert not moe.grouped_mm_kernel_ok(torch.randn(5, 13), odd.experts.down_proj.transpose(1, 2))
    # odd expert sizes: transformers' default "grouped_mm" path hands them to the kernel, which
    # rejects them on CPU; ours falls back and still equals eager
    compare_block("qwen3_vl_moe", False, moe_intermediate_size=13)


def text_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, VOCAB, (2, 12), generator=g)
    att = torch.ones_like(ids)
    att[1, 9:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[att == 0] = -100
    return ids, att, labels


def hf_model(family: str, coef: float):
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeForConditionalGeneration as Cls
        cfg = vl_moe_config(router_aux_loss_coef=coef)
    else:
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerForConditionalGeneration as Cls)
        cfg = omni_thinker_config(router_aux_loss_coef=coef)
    torch.manual_seed(0)
    model = Cls(cfg).float()
    with torch.no_grad():  # routers start at zero in some inits: make routing non-trivial
        for m in model.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0, 0.5)
    model.config.use_cache = False
    return model


class TextOnlyFamily:
    """The two calls TrainModel makes of a family, for a text-only batch of a Qwen3 MoE model."""
    name = "test_moe"

    def module_groups(self):
        from omnitune.models.base import ModuleGroup
        return [ModuleGroup("text_decoder", ("model.language_model", "lm_head"))]

    def forward_hidden(self, model, batch):
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.last_hidden_state, out.last_hidden_state.new_zeros(())

    def lm_head(self, model):
        return model.lm_head


def _family():
    from omnitune.models.base import ModelFamily
    fam = TextOnlyFamily()
    for name in ("module_roots", "module_layers"):
        setattr(fam, name, getattr(ModelFamily, name).__get__(fam))
    return fam


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_omni_moe"])
def test_train_model_fused_moe_and_router_aux_equal_hf(family):
    """TrainModel with use_npu_fused_moe + router_aux_loss_coef: loss = CE + coef * aux and grads equal
    transformers' forward(labels, output_router_logits=True) with eager experts (1e-5)."""
    from omnitune.config.model import ModelJson
    from omnitune.train.model import TrainModel

    coef = 0.3
    ids, att, labels = text_batch()
    ref = hf_model(family, coef)
    ours_hf = copy.deepcopy(ref)
    moe.set_experts_implementation(moe.experts_modules(ref), fused=False)
    out = ref(input_ids=ids, attention_mask=att, labels=labels, output_router_logits=True)
    out.loss.backward()
    plain = ref(input_ids=ids, attention_mask=att, labels=labels, output_router_logits=False).loss.item()
    assert out.aux_loss.item() > 0
    # the aux term moves the loss by exactly coef * aux
    assert abs((out.loss.item() - plain) - coef * out.aux_loss.item()) < 1e-6

    cfg = ModelJson(model_id="qwen2vl", text_decoder={"use_npu_fused_moe": True},
                    loss_cfg={"router_aux_loss_coef": coef})
    tm = TrainModel(ours_hf, _family(), cfg)
    assert tm.settings_report["text_decoder"]["experts"] == 2
    assert all(e.config._experts_implementation == moe.IMPL_NAME for e in moe.experts_modules(tm.hf))
    _assert_matches_hf(tm, ref, out, {"input_ids": ids, "attention_mask": att, "labels": labels}, coef)


def test_router_aux_not_recorded_twice_with_recompute():
    from omnitune.config.model import ModelJson
    from omnitune.train.model import TrainModel

    ids, att, labels = text_batch()
    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    res = []
    for td in ({}, full):
        tm = TrainModel(hf_model("qwen3_vl_moe", 0.1), _family(),
                        ModelJson(model_id="qwen2vl", text_decoder=td, loss_cfg={"router_aux_loss_coef": 0.1}))
        loss_sum, n, aux = tm({"input_ids": ids, "attention_mask": att, "labels": labels})
        (loss_sum / n + aux).backward()
        assert tm._router.logits == [] and not tm._router.active
        res.append((aux.item(), tm.hf.model.language_model.layers[0].mlp.gate.weight.grad.clone()))
    assert abs(res[0][0] - res[1][0]) < 1e-7
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-6, atol=1e-7)


def test_router_aux_on_dense_model_is_a_config_error():
    from omnitune.config.errors import ConfigError
    from omnitune.config.model import ModelJson
    from omnitune.models.registry import get_family
    from omnitune.train.model import TrainModel

    fam = get_family("qwen2_vl")
    hf = fam.model_class()(fam.tiny_config())
    with pytest.raises(ConfigError, match="router_aux_loss_coef: .*no MoE routers"):
        TrainModel(hf, fam, ModelJson(model_id="qwen2vl", loss_cfg={"router_aux_loss_coef": 0.01}))


@pytest.mark.parametrize("name", ["qwen3_vl_moe", "qwen3_omni_moe"])
def test_registered_families_fused_moe_and_router_aux_equal_hf(name):
    """The real family specs (their forward_hidden, module groups): fused experts + router aux loss
    through TrainModel equal transformers' forward(labels, output_router_logits=True) with eager experts."""
    from omnitune.config.model import ModelJson
    from omnitune.models.registry import get_family
    from omnitune.train.model import TrainModel

    coef = 0.05
    fam = get_family(name)
    cfg = fam.tiny_config()
    fam.text_config(cfg).router_aux_loss_coef = coef
    torch.manual_seed(0)
    ref = fam.model_class()(cfg).float()
    ref.config.use_cache = False
    with torch.no_grad():
        for m in ref.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0, 0.5)
    ours_hf = copy.deepcopy(ref)
    moe.set_experts_implementation(moe.experts_modules(ref), fused=False)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(100, 5000, (2, 12), generator=g)
    att = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :5] = -100
    out = ref(input_ids=ids, attention_mask=att, labels=labels, output_router_logits=True)
    out.loss.backward()
    tm = TrainModel(ours_hf, fam, ModelJson(model_id=fam.model_ids[0], text_decoder={"use_npu_fused_moe": True},
                                            loss_cfg={"router_aux_loss_coef": coef}))
    _assert_matches_hf(tm, ref, out, {"input_ids": ids, "attention_mask": att, "labels": labels}, coef)
