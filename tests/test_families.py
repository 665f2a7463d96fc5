"""Every model family: registry, real special-token ids, tiny HF folders that plain transformers
reloads tensor for tensor, processors that reload offline, and chat templates whose rendering the
processor expands and the model accepts (image + video, + audio for Omni)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from omnitune.models.registry import FAMILIES, family_for_hf_config, family_for_model_id, get_family

ALL = sorted(FAMILIES)
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")

# model.json model_id and data template each family answers to (SPEC / MindSpeed-MM names)
EXPECTED = {
    "qwen2_vl": ("qwen2vl", "qwen2vl"),
    "qwen2_5_vl": ("qwen2_5vl", "qwen2vl"),
    "qwen2_5_omni": ("qwen2_5_omni", "qwen2_omni"),
    "qwen3_vl": ("qwen3_vl", "qwen3_vl"),
    "qwen3_vl_moe": ("qwen3_vl_moe", "qwen3_vl"),
    "qwen3_omni_moe": ("qwen3_omni_moe", "qwen3_omni"),
}

# The real checkpoints' special-token ids (config.json of Qwen2.5-VL / Qwen2.5-Omni / Qwen3-VL /
# Qwen3-Omni) and the token text their tokenizers give them.
REAL_TOKENS = {
    "qwen2_vl": {"<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|vision_start|>": 151652,
                 "<|vision_end|>": 151653},
    "qwen2_5_vl": {"<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|vision_start|>": 151652,
                   "<|vision_end|>": 151653},
    "qwen3_vl": {"<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|vision_start|>": 151652,
                 "<|vision_end|>": 151653},
    "qwen3_vl_moe": {"<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|vision_start|>": 151652,
                     "<|vision_end|>": 151653},
    "qwen2_5_omni": {"<|IMAGE|>": 151655, "<|VIDEO|>": 151656, "<|AUDIO|>": 151646, "<|vision_bos|>": 151652,
                     "<|vision_eos|>": 151653, "<|audio_bos|>": 151647, "<|audio_eos|>": 151648},
    "qwen3_omni_moe": {"<|image_pad|>": 151655, "<|video_pad|>": 151656, "<|audio_pad|>": 151675,
                       "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|audio_start|>": 151669,
                       "<|audio_end|>": 151670},
}


def _cfg_id(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    raise AttributeError(names)


@pytest.mark.parametrize("name", ALL)
def test_registry_ids_and_structure(name):
    fam = get_family(name)
    model_id, template = EXPECTED[name]
    assert fam.name == name and family_for_model_id(model_id) is fam and fam.template == template
    cfg = fam.tiny_config("tiny")
    assert family_for_hf_config(cfg) is fam
    t = fam.text_config(cfg)
    assert (t.hidden_size, t.num_hidden_layers) == (64, 2)
    folder_cfg = fam.tiny_folder_config("tiny")     # Omni: the full model's config
    assert type(folder_cfg).__name__ == fam.hf_config_class_name and family_for_hf_config(folder_cfg) is fam
    assert fam.text_config(folder_cfg).to_dict() == t.to_dict()
    assert fam.structure_sizes(folder_cfg) == fam.structure_sizes(cfg)
    # the config's special ids are the real checkpoint's
    real = REAL_TOKENS[name]
    img = "<|IMAGE|>" if name == "qwen2_5_omni" else "<|image_pad|>"
    vid = "<|VIDEO|>" if name == "qwen2_5_omni" else "<|video_pad|>"
    assert _cfg_id(cfg, "image_token_id", "image_token_index") == real[img]
    assert _cfg_id(cfg, "video_token_id", "video_token_index") == real[vid]
    assert cfg.vision_start_token_id == 151652 and cfg.vision_end_token_id == 151653
    if name in OMNI:
        aud = "<|AUDIO|>" if name == "qwen2_5_omni" else "<|audio_pad|>"
        assert _cfg_id(cfg, "audio_token_id", "audio_token_index") == real[aud]
    # module groups / towers / fsdp units point at real submodules of the trainable model
    with torch.device("meta"):
        model = fam.model_class()(cfg)
    for g in fam.module_groups():
        for p in g.paths + g.exclude:
            assert isinstance(model.get_submodule(p), torch.nn.Module), (name, g.name, p)
    names = {g.name for g in fam.module_groups()}
    assert {"image_encoder.vision_encoder", "image_encoder.vision_projector", "text_decoder"} <= names
    assert ("audio_encoder.audio_encoder" in names) == (name in OMNI)
    assert fam.vision_tower(model) is not None
    assert (fam.audio_tower(model) is not None) == (name in OMNI)
    units = fam.fsdp_units(model)
    assert len(units) >= 4 and len({id(u) for u in units}) == len(units)
    sizes = fam.structure_sizes(cfg)
    assert sizes["text_decoder.num_layers"] == 2 and sizes["text_decoder.hidden_size"] == 64


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


@pytest.mark.parametrize("name", ALL)
def test_tiny_folder_reloads_in_plain_transformers(name, tiny_model_dir, tmp_path):
    fam = get_family(name)
    d = tiny_model_dir(name)
    on_disk = _tensors(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    if name in OMNI:
        # a FULL real-style folder: thinker + talker + vocoder, trainable part under "thinker."
        assert cfg["architectures"] == [fam.hf_full_class_name]
        heads = {k.split(".")[0] for k in on_disk}
        assert heads == {"thinker", "talker", "token2wav" if name == "qwen2_5_omni" else "code2wav"}
        assert any(k.startswith("thinker.audio_tower.") for k in on_disk)
        assert any(k.startswith("thinker.visual.") for k in on_disk)
    else:
        assert cfg["architectures"] == [fam.hf_class_name]
    # (no output_loading_info: Qwen2_5OmniForConditionalGeneration.from_pretrained breaks with it in
    # transformers 5.23; a missing key would be re-initialised and a dropped one absent below.)
    model = fam.folder_class().from_pretrained(d)
    assert type(model).__name__ == (fam.hf_full_class_name or fam.hf_class_name)
    model.save_pretrained(tmp_path / "again")
    again = _tensors(tmp_path / "again" / "model.safetensors")
    assert sorted(again) == sorted(on_disk)
    for k, v in on_disk.items():
        assert torch.equal(again[k], v), k


@pytest.mark.parametrize("name", ALL)
def test_tiny_weights_all_initialised_and_seeded(name):
    """No tensor of a fresh tiny model is left as uninitialised memory (transformers 5.23 leaves
    Qwen3-Omni's talker experts as torch.empty): memory primed with NaN must not show through and
    two builds with one seed are equal."""
    fam = get_family(name)
    cfg = fam.tiny_folder_config("tiny")

    def build():
        junk = torch.full((1 << 22,), float("nan"))
        del junk
        torch.manual_seed(0)
        m = fam.folder_class()(cfg)
        fam.init_tiny_model(m, torch.Generator().manual_seed(0))
        return m.state_dict()

    a, b = build(), build()
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all() and torch.equal(v, b[k]), k


# ---------------------------------------------------------------------------------- processors
def _media(tmp_path: Path, side: int, vside: int):
    """A JPEG, a 4-frame MP4 (PyAV) and a 1 s WAV (soundfile) on disk, read back the way the data
    pipeline reads them."""
    import av
    import soundfile as sf
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(tmp_path / "img.jpg")
    with av.open(str(tmp_path / "clip.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=2)
        s.width = s.height = vside
        s.pix_fmt = "yuv420p"
        for _ in range(4):
            fr = av.VideoFrame.from_ndarray(rng.integers(0, 255, (vside, vside, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    sf.write(tmp_path / "sound.wav", (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)

    img = Image.open(tmp_path / "img.jpg").convert("RGB")
    with av.open(str(tmp_path / "clip.mp4")) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    meta = VideoMetadata(total_num_frames=len(frames), fps=2.0, width=vside, height=vside,
                         duration=len(frames) / 2.0, frames_indices=list(range(len(frames))))
    audio, sr = sf.read(tmp_path / "sound.wav", dtype="float32")
    assert sr == 16000
    return img, frames, meta, audio


def _audio_tokens(name: str, frames: int) -> int:
    if name == "qwen2_5_omni":
        return (((frames - 1) // 2 + 1) - 2) // 2 + 1
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths
    return int(_get_feat_extract_output_lengths(torch.tensor(frames)))


@pytest.mark.parametrize("name", ALL)
def test_processor_reloads_offline_and_template_renders_all_modalities(name, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    import huggingface_hub.constants
    from transformers import AutoProcessor

    fam = get_family(name)
    d = tiny_model_dir(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    proc = AutoProcessor.from_pretrained(d)
    built = fam.build_processor(__import__("omnitune.models.tiny", fromlist=["x"]).load_qwen_tokenizer)
    assert type(proc) is type(built)
    assert proc.chat_template == built.chat_template
    tok = proc.tokenizer
    for text, tid in REAL_TOKENS[name].items():
        assert tok.convert_tokens_to_ids(text) == tid, text
    omni = name in OMNI
    if omni:
        fe = proc.feature_extractor
        assert (type(fe).__name__, fe.feature_size, fe.sampling_rate) == ("WhisperFeatureExtractor", 128, 16000)

    patch = proc.image_processor.patch_size
    img, frames, meta, audio = _media(tmp_path, side=patch * 16, vside=patch * 4)
    content = [{"type": "image", "image": str(tmp_path / "img.jpg")},
               {"type": "video", "video": str(tmp_path / "clip.mp4")}]
    if omni:
        content.append({"type": "audio", "audio": str(tmp_path / "sound.wav")})
    content.append({"type": "text", "text": "What is shown and heard?"})
    conv = [{"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat meowing."}]}]
    text = proc.apply_chat_template(conv, tokenize=False)
    img_t, vid_t = proc.image_token, proc.video_token
    assert text.count(img_t) == 1 and text.count(vid_t) == 1
    assert text.rstrip("\n").endswith("<|im_start|>assistant\nA cat meowing.<|im_end|>")
    assert "<|im_start|>user\n" in text
    if omni:
        assert text.count(proc.audio_token) == 1
        assert text.index(img_t) < text.index(vid_t) < text.index(proc.audio_token)

    kw = dict(text=[text], images=[img], videos=[frames], video_metadata=[meta], return_tensors="pt",
              images_kwargs={"size": {"shortest_edge": (patch * 8) ** 2, "longest_edge": (patch * 8) ** 2}},
              videos_kwargs={"size": {"shortest_edge": (patch * 4) ** 2, "longest_edge": (patch * 4) ** 2 * 4},
                             "do_sample_frames": False})
    if omni:
        kw["audio"] = [audio]
    batch = proc(**kw)
    ids = batch["input_ids"][0]
    merge2 = proc.image_processor.merge_size ** 2
    assert int((ids == tok.convert_tokens_to_ids(img_t)).sum()) == int(batch["image_grid_thw"].prod()) // merge2
    assert int((ids == tok.convert_tokens_to_ids(vid_t)).sum()) == int(batch["video_grid_thw"].prod()) // merge2
    assert tuple(batch["image_grid_thw"][0].tolist()) == (1, 8, 8)
    if omni:
        n_frames = int(batch["feature_attention_mask"].sum())
        assert n_frames == 100     # 1 s at hop 160
        assert batch["input_features"].shape[1] == 128
        assert int((ids == tok.convert_tokens_to_ids(proc.audio_token)).sum()) == _audio_tokens(name, n_frames)

    # the model consumes exactly what the processor produced (HF checks feature/token counts)
    model = fam.folder_class().from_pretrained(d)
    trainable = getattr(model, "thinker", model)
    assert type(trainable).__name__ == fam.hf_class_name
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        out = trainable(**batch, labels=labels)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
