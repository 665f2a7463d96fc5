"""Every template and modality against the family's HF processor + its real chat template (built
offline by omnitune.models.tiny): ids, labels (which tokens are trained), mm_token_type_ids and the
media tensors, with and without a system prompt, multi-turn, thinking on/off, audio in video."""
from __future__ import annotations

import re

import pytest
import torch
from media_util import hf_messages, jpeg, media_order, mp4, sampled, wav, write_config

from omnitune.config.data import load_data_config
from omnitune.data import build_train_dataset
from omnitune.data.audio import load_audio
from omnitune.data.templates import TEMPLATES
from omnitune.data.video import processor_size

PRE = {"image_min_pixels": 32 * 32 * 4, "image_max_pixels": 32 * 32 * 16,
       "video_min_pixels": 32 * 32, "video_max_pixels": 32 * 32 * 4, "video_fps": 2.0}
FAMILY = {"qwen2vl": "qwen2_5_vl", "qwen2_omni": "qwen2_5_omni", "qwen3_vl": "qwen3_vl",
          "qwen3_vl_nothink": "qwen3_vl", "qwen3_omni": "qwen3_omni_moe", "qwen3_omni_nothink": "qwen3_omni_moe"}
THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def processors(tiny_model_dir):
    from transformers import AutoProcessor

    cache = {}

    def get(template):
        fam = FAMILY[template]
        if fam not in cache:
            cache[fam] = AutoProcessor.from_pretrained(tiny_model_dir(fam))
        return cache[fam]
    return get


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return d, {"img": jpeg(d / "img.jpg", (90, 70), 1), "img2": jpeg(d / "img2.jpg", (64, 128), 2),
               "v3s": mp4(d / "v3s.mp4", 30, 10, (96, 64), 1), "v3s_b": mp4(d / "v3s_b.mp4", 30, 10, (64, 96), 2),
               "v2_5s": mp4(d / "v2_5s.mp4", 25, 10, (64, 96), 2),
               "va": mp4(d / "va.mp4", 50, 10, (64, 64), 3, audio_rate=16000),
               "a1": wav(d / "a1.wav", 1.0, 16000), "a2": wav(d / "a2.wav", 0.5, 44100, channels=2, seed=1)}


def _turns(*texts, system=None):
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def hf_reference(processor, template, messages, d, images, videos, audios, use_audio_in_video):
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    text = processor.apply_chat_template(hf_messages(messages), tokenize=False)
    size = {"shortest_edge": PRE["image_min_pixels"], "longest_edge": PRE["image_max_pixels"]}
    kw = {"return_tensors": "pt", "images_kwargs": {"size": size}}
    if images:
        kw["images"] = [Image.open(d / f).convert("RGB") for f in images]
    if videos:
        frames, metas = [], []
        for f in videos:
            fr, idx, fps, duration, total = sampled(d / f, PRE["video_fps"])
            frames.append(fr)
            metas.append(VideoMetadata(total_num_frames=total, fps=fps, duration=duration, frames_indices=idx,
                                       width=fr.shape[2], height=fr.shape[1]))
        lo, hi = processor_size(len(metas[0].frames_indices), processor.video_processor.temporal_patch_size,
                                PRE["video_min_pixels"], PRE["video_max_pixels"], TEMPLATES[template].video_pixels_per)
        kw.update(videos=frames, video_metadata=metas,
                  videos_kwargs={"size": {"shortest_edge": lo, "longest_edge": hi}, "do_sample_frames": False,
                                 "cap_pixels_per_frame": False, "fps": metas[0].sampled_fps})
    order = media_order(messages, use_audio_in_video)
    if order:
        kw["audio"] = [load_audio(str(d / (audios[i] if kind == "audio" else videos[i])), "ref", 16000,
                                  from_video=kind == "video") for kind, i in order]
    if use_audio_in_video:
        kw.update(load_audio_from_video=True, audio_from_video_indices=[i if k == "video" else None for k, i in order])
    return processor(text=[text], **kw)


def trained_texts(tokenizer, ids, labels):
    runs, cur = [], []
    for tok_id, label in zip(ids.tolist(), labels.tolist()):
        if label != -100:
            assert label == tok_id
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    return [tokenizer.decode(r) for r in runs + ([cur] if cur else [])]


def check(tmp_path, processors, media, template, messages, *, images=(), videos=(), audios=(),
          use_audio_in_video=False, enable_thinking=None, hf_answers=None, trained=None, basic=None):
    """Build our item, compare with the HF reference. ``hf_answers``: the assistant contents as the
    reference chat template sees them (reasoning templates add the empty thought); ``trained``:
    the decoded trained runs we expect."""
    d, files = media
    processor = processors(template)
    images, videos, audios = [files[x] for x in images], [files[x] for x in videos], [files[x] for x in audios]
    sample = {"messages": messages, "images": [str(d / f) for f in images], "videos": [str(d / f) for f in videos],
              "audios": [str(d / f) for f in audios]}
    pre = {**PRE, "use_audio_in_video": use_audio_in_video}
    cfg = write_config(tmp_path, [sample], template=template, pre=pre,
                       basic={**(basic or {}), **({} if enable_thinking is None else
                                                  {"enable_thinking": enable_thinking})})
    item = build_train_dataset(load_data_config(cfg), processor, 8192)[0]
    ref_msgs = [dict(m) for m in messages]
    if hf_answers is not None:
        answers = iter(hf_answers)
        for m in ref_msgs:
            if m["role"] == "assistant":
                m["content"] = next(answers)
    ref = hf_reference(processor, template, ref_msgs, d, images, videos, audios, use_audio_in_video)
    assert processor.tokenizer.decode(item["input_ids"]) == processor.tokenizer.decode(ref["input_ids"][0])
    assert item["input_ids"].tolist() == ref["input_ids"][0].tolist()
    if "mm_token_type_ids" in ref:
        assert item["mm_token_type_ids"].tolist() == ref["mm_token_type_ids"][0].tolist()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert (key in item) == (key in ref), key
        if key in ref:
            assert torch.equal(item[key], ref[key]), key
    for key in ("second_per_grid_ts", "video_second_per_grid"):
        if key in ref and videos:
            assert torch.allclose(item[key].double(), torch.as_tensor(ref[key]).double()), key
    if "input_features" in ref:
        mask = ref["feature_attention_mask"]
        assert item["feature_attention_mask"].sum(-1).tolist() == mask.sum(-1).tolist()
        for i, n in enumerate(mask.sum(-1).tolist()):
            assert torch.allclose(item["input_features"][i, :, :n], ref["input_features"][i, :, :n], atol=1e-5)
    else:
        assert "input_features" not in item
    if trained is None:
        # a leading newline of an answer merges with the header's into one (untrained) token
        trained = [m["content"].lstrip("\n") + "<|im_end|>\n" for m in ref_msgs if m["role"] == "assistant"]
    assert trained_texts(processor.tokenizer, item["input_ids"], item["labels"]) == trained
    return item, ref


ALL = sorted(TEMPLATES)
REASONING = [t for t in ALL if TEMPLATES[t].reasoning]
OMNI = [t for t in ALL if TEMPLATES[t].audio is not None]


def _answers(template, *answers):
    """The assistant contents the reference sees with enable_thinking unset (= true)."""
    return [THINK + a if TEMPLATES[template].reasoning else a for a in answers]


@pytest.mark.parametrize("template", ALL)
def test_text_multi_turn_with_and_without_system(tmp_path, processors, media, template):
    for system in (None, "You answer in one word."):
        msgs = _turns("Hi there.", "Hello!", "\nHow are you?\n", "\nFine, thanks.\n", system=system)
        check(tmp_path, processors, media, template, msgs, hf_answers=_answers(template, "Hello!", "\nFine, thanks.\n"))
    cfg = write_config(tmp_path, [{"messages": msgs}], template=template, pre=PRE, basic={"train_on_prompt": True})
    item = build_train_dataset(load_data_config(cfg), processors(template), 8192)[0]
    assert torch.equal(item["labels"], item["input_ids"])  # train_on_prompt: every token


@pytest.mark.parametrize("template", ALL)
def test_images_and_videos(tmp_path, processors, media, template):
    msgs = _turns("<image>Compare with <video>.", "Different.", "And <image><video>?", "Same.", system="Be brief.")
    # the HF processor takes one size for all videos of a call: Qwen3-VL's per-clip pixel bound then
    # needs equal frame counts to compare (our bound is per video)
    item, ref = check(tmp_path, processors, media, template, msgs, images=["img", "img2"], videos=["v3s", "v3s_b"],
                      hf_answers=_answers(template, "Different.", "Same."))
    assert (item["mm_token_type_ids"] == 2).sum() > 0 and (item["mm_token_type_ids"] == 1).sum() > 0
    if TEMPLATES[template].video_layout == "frames":  # Qwen3-VL: "<t seconds>" per temporal step
        text = processors(template).tokenizer.decode(item["input_ids"])
        # frames 0,5,11,17,23,29 of 10 fps videos; a step's time is the mean of its two frames'
        assert re.findall(r"<(\d+\.\d) seconds><\|vision_start\|>", text) == ["0.2", "1.4", "2.6"] * 2
        # no start/end pair around a whole video (Qwen's processor, LLaMA-Factory's Qwen3VLPlugin)
        assert "with <0.2 seconds>" in text and "<|vision_start|><0." not in text and "<|vision_end|>" * 2 not in text


@pytest.mark.parametrize("template", ALL)
def test_one_video_with_an_odd_frame_count(tmp_path, processors, media, template):
    item, _ = check(tmp_path, processors, media, template, _turns("Watch <video> now.", "Done."), videos=["v2_5s"],
                    hf_answers=_answers(template, "Done."))
    assert item["video_grid_thw"][0, 0].item() == 3  # 5 sampled frames, the last one repeated


@pytest.mark.parametrize("template", OMNI)
def test_audio(tmp_path, processors, media, template):
    msgs = _turns("<audio>What is said? <image>", "A tone.", "And <audio>?", "Another tone.")
    item, _ = check(tmp_path, processors, media, template, msgs, images=["img"], audios=["a1", "a2"],
                    hf_answers=_answers(template, "A tone.", "Another tone."))
    assert (item["mm_token_type_ids"] == 3).sum() > 0


@pytest.mark.parametrize("template", OMNI)
def test_use_audio_in_video(tmp_path, processors, media, template):
    msgs = _turns("<video>Describe the sound.", "A tone.")
    item, ref = check(tmp_path, processors, media, template, msgs, videos=["va"], use_audio_in_video=True,
                      hf_answers=_answers(template, "A tone."))
    types = item["mm_token_type_ids"].tolist()
    first_audio, last_video = types.index(3), len(types) - 1 - types[::-1].index(2)
    assert first_audio < last_video  # interleaved in time, not video then audio


@pytest.mark.parametrize("template", REASONING)
def test_thinking_on_off(tmp_path, processors, media, template):
    msgs = _turns("<image>What?", "Noise.", "Sure?", "<think>\nLook again.\n</think>\n\nYes.")
    # on (and unset): empty thought added to answers without one, trained; thoughts kept
    check(tmp_path, processors, media, template, msgs, images=["img"], enable_thinking=True,
          hf_answers=[THINK + "Noise.", "<think>\nLook again.\n</think>\n\nYes."])
    # off: thoughts removed, the empty thought closes every prompt, untrained
    check(tmp_path, processors, media, template, msgs, images=["img"], enable_thinking=False,
          hf_answers=[THINK + "Noise.", THINK + "Yes."], trained=["Noise.<|im_end|>\n", "Yes.<|im_end|>\n"])
    # off + mask_history + train_on_prompt: everything but the first answer
    item, _ = check(tmp_path, processors, media, template, msgs, images=["img"], enable_thinking=False,
                    basic={"mask_history": True}, hf_answers=[THINK + "Noise.", THINK + "Yes."],
                    trained=["Yes.<|im_end|>\n"])


HF_MODELS = {"qwen2vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
             "qwen2_omni": "Qwen2_5OmniThinkerForConditionalGeneration",
             "qwen3_omni_nothink": "Qwen3OmniMoeThinkerForConditionalGeneration"}


@pytest.mark.parametrize("template", sorted(HF_MODELS))
def test_collated_mixed_batch_through_the_hf_model_equals_its_items(tmp_path, processors, media, tiny_model_dir,
                                                                    template):
    """A mixed batch (video [+ its sound + an audio], image, text-only or audio-only): the HF model's
    loss on the collated batch equals the token-weighted mean of its losses on each item alone, so
    the collator hands every item its own media (order kept, audio features padded and masked)."""
    import transformers
    from transformers import AutoConfig

    from omnitune.data import Collator

    d, files = media
    omni = TEMPLATES[template].audio is not None
    processor = processors(template)
    cfg = AutoConfig.from_pretrained(tiny_model_dir(FAMILY[template]))
    torch.manual_seed(0)
    model = getattr(transformers, HF_MODELS[template])._from_config(cfg.thinker_config if omni else cfg,
                                                                    dtype=torch.float32).eval()
    f = {k: str(d / v) for k, v in files.items()}
    if omni:
        samples = [{"messages": _turns("<video>Hear <audio>?", "Tones."), "videos": [f["va"]], "audios": [f["a1"]]},
                   {"messages": _turns("<image>What?", "Noise."), "images": [f["img"]]},
                   {"messages": _turns("<audio>only", "A longer answer here."), "audios": [f["a2"]]}]
    else:
        samples = [{"messages": _turns("<video>What moves?", "Bars."), "videos": [f["v2_5s"]]},
                   {"messages": _turns("<image>What?", "Noise."), "images": [f["img"]]},
                   {"messages": _turns("Text only, please.", "A longer answer here.")}]
    pre = {**PRE, "use_audio_in_video": omni}
    ds = build_train_dataset(load_data_config(write_config(tmp_path, samples, template=template, pre=pre)),
                             processor, 4096)
    items = [ds[i] for i in range(3)]
    collate = Collator(processor.tokenizer.pad_token_id)

    def loss(batch):
        drop = ("num_tokens", "mm_token_type_ids") if omni else ("num_tokens",)
        kw = {k: v for k, v in batch.items() if k not in drop}
        with torch.no_grad():
            return model(**kw, **({"use_audio_in_video": True} if omni else {})).loss.item()

    counts = [int((it["labels"][1:] != -100).sum()) for it in items]
    expected = sum(loss(collate([it])) * n for it, n in zip(items, counts)) / sum(counts)
    assert abs(loss(collate(items)) - expected) <= 1e-5 * expected


def test_a_template_that_does_not_fit_the_processor_is_refused(tmp_path, processors):
    from omnitune.data import DataError

    cfg = write_config(tmp_path, [{"messages": _turns("q", "a")}], template="qwen2_omni", pre=PRE)
    with pytest.raises(DataError, match=r"data\.json: basic_parameters\.template 'qwen2_omni' does not fit the "
                                        r"model's processor \(<\|vision_bos\|> is not a token of its tokenizer"):
        build_train_dataset(load_data_config(cfg), processors("qwen3_vl"), 4096)
    cfg = write_config(tmp_path, [{"messages": _turns("q", "a")}], template="qwen3_omni", pre=PRE)
    with pytest.raises(DataError, match=r"its image token is <\|IMAGE\|>, the template's <\|image_pad\|>"):
        build_train_dataset(load_data_config(cfg), processors("qwen2_omni"), 4096)
