"""attn_implementation per model.json module: set on the right HF sub-config, eager and sdpa give the
same loss, flash_attention_2 without the package is a config error before launch."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from omnitune.config.model import ModelJson, unsupported_settings
from omnitune.ops.attention import flash_attn_available
from omnitune.train.model import TrainModel

from test_recompute import image_batch, tiny_hf


def _cfg(vision: str | None, text: str | None) -> ModelJson:
    d = {"model_id": "qwen2vl"}
    if vision:
        d["image_encoder"] = {"vision_encoder": {"attn_implementation": vision}}
    if text:
        d["text_decoder"] = {"attn_implementation": text}
    return ModelJson.model_validate(d)


def test_eager_and_sdpa_per_module_same_loss_and_grads():
    fam, hf = tiny_hf()
    batch = image_batch()
    out = {}
    for vision, text in (("eager", "eager"), ("sdpa", "sdpa"), ("eager", "sdpa")):
        tm = TrainModel(copy.deepcopy(hf), fam, _cfg(vision, text))
        assert tm.hf.model.visual.blocks[0].attn.config._attn_implementation == vision
        assert tm.hf.model.language_model.layers[0].self_attn.config._attn_implementation == text
        loss, n, aux = tm(batch)
        (loss / n + aux).backward()
        out[(vision, text)] = (loss.item() / n.item(),
                               {k: p.grad.clone() for k, p in tm.hf.named_parameters() if p.grad is not None})
    ref_loss, ref_grads = out[("eager", "eager")]
    for key, (loss, grads) in out.items():
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (key, loss, ref_loss)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key} {k}: {m}")


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_flash_attention_2_missing_is_a_clear_config_error(tiny_qwen2vl, tmp_path):
    problems = unsupported_settings(_cfg("flash_attention_2", None))
    assert any("image_encoder.vision_encoder.attn_implementation 'flash_attention_2' needs the flash-attn package"
               in p for p in problems), problems
    # and the CLI refuses before launching anything
    from spine_util import omnitune, train_flags, write_configs

    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl)
    m = json.loads(model_json.read_text())
    m["text_decoder"]["attn_implementation"] = "flash_attention_2"
    model_json.write_text(json.dumps(m))
    flags = train_flags(data_json, model_json, iters=1, save=tmp_path / "s", load=tiny_qwen2vl)
    r = omnitune(["train", *flags, "--dry-run"], check=False, timeout=120)
    assert r.returncode == 2
    assert "text_decoder.attn_implementation 'flash_attention_2' needs the flash-attn package" in r.stderr, r.stderr
