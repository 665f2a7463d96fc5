"""Video and audio in the data pipeline: ids, labels and media tensors equal the HF processor's
(its chat template + __call__ on the same conversation and the same sampled frames / waveform),
frame sampling, resampling, and the media bad-input cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from media_util import hf_messages, jpeg, mp4, sampled, wav, write_config

from omnitune.config.data import load_data_config
from omnitune.data import DataError, build_train_dataset
from omnitune.data.audio import load_audio, resample

VIDEO_PAD, IMAGE_PAD = 151656, 151655
PIX = {"image_min_pixels": 56 * 56, "image_max_pixels": 28 * 28 * 64,
       "video_min_pixels": 28 * 28, "video_max_pixels": 56 * 84, "video_fps": 2.0}


def _turns(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def build(tmp, samples, processor, seq=4096, **kw):
    kw.setdefault("pre", PIX)
    return build_train_dataset(load_data_config(write_config(tmp, samples, **kw)), processor, seq)


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


def qwen2vl_reference(processor, messages, image_files, video_files, pre=PIX):
    """HF chat template + processor on the same conversation; frames sampled as documented."""
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    text = processor.apply_chat_template(hf_messages(messages), tokenize=False)
    videos, metas = [], []
    for f in video_files:
        frames, idx, fps, duration, total = sampled(f, pre["video_fps"], pre.get("video_maxlen", 128))
        videos.append(frames)
        metas.append(VideoMetadata(total_num_frames=total, fps=fps, duration=duration, frames_indices=idx,
                                   width=frames.shape[2], height=frames.shape[1]))
    images = [Image.open(p).convert("RGB") for p in image_files] or None
    return processor(text=[text], images=images, videos=videos or None, video_metadata=metas or None,
                     return_tensors="pt",
                     images_kwargs={"size": {"shortest_edge": pre["image_min_pixels"],
                                             "longest_edge": pre["image_max_pixels"]}},
                     videos_kwargs={"size": {"shortest_edge": pre["video_min_pixels"],
                                             "longest_edge": pre["video_max_pixels"]},
                                    "do_sample_frames": False, "cap_pixels_per_frame": False})


VIDEO_CASES = {
    "one_video": (_turns("<video>What happens?", "Bars move."), [], ["v3s"]),
    "odd_frame_count": (_turns("Watch <video> now.", "Done."), [], ["v2_5s"]),
    "image_and_video_multi_turn_system": (
        [{"role": "system", "content": "Be brief."},
         *_turns("<image>and<video>: same?", "No.", "And <video>?", "Also no.")], ["a"], ["v3s", "v2_5s"]),
}


@pytest.mark.parametrize("case", sorted(VIDEO_CASES))
def test_qwen2vl_video_ids_labels_pixels_equal_hf(tmp_path, processor, case):
    msgs, image_names, video_names = VIDEO_CASES[case]
    files = {"a": jpeg(tmp_path / "a.jpg"), "v3s": mp4(tmp_path / "v3s.mp4", 30, 10, (96, 64), 1),
             "v2_5s": mp4(tmp_path / "v2_5s.mp4", 25, 10, (80, 120), 2)}
    sample = {"messages": msgs, "images": [files[n] for n in image_names], "videos": [files[n] for n in video_names]}
    item = build(tmp_path, [sample], processor)[0]
    ref = qwen2vl_reference(processor, msgs, [tmp_path / files[n] for n in image_names],
                            [tmp_path / files[n] for n in video_names])
    assert item["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert item["mm_token_type_ids"].tolist() == ref["mm_token_type_ids"][0].tolist()
    assert 2 in item["mm_token_type_ids"].tolist()
    assert torch.equal(item["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(item["pixel_values_videos"], ref["pixel_values_videos"])
    if image_names:
        assert torch.equal(item["pixel_values"], ref["pixel_values"])
        assert torch.equal(item["image_grid_thw"], ref["image_grid_thw"])
    answers = [m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant"]
    assert trained_texts(processor.tokenizer, item["input_ids"], item["labels"]) == answers
    assert int((item["input_ids"] == VIDEO_PAD).sum()) == int(ref["video_grid_thw"].prod(-1).sum()) // 4


def test_video_sampling_follows_video_fps_and_maxlen(tmp_path, processor):
    v = mp4(tmp_path / "v.mp4", 40, 10, (64, 64))  # 4 s at 10 fps
    msgs = _turns("<video>?", "!")
    for fps, maxlen, n_frames in [(2.0, 128, 8), (1.0, 128, 4), (2.0, 5, 5), (0.1, 128, 1), (20.0, 128, 40)]:
        ds = build(tmp_path, [{"messages": msgs, "videos": [v]}], processor,
                   pre={**PIX, "video_fps": fps, "video_maxlen": maxlen})
        info = ds.media[0].videos[0]
        assert info.indices == tuple(int(i) for i in np.linspace(0, 39, n_frames).astype(np.int32))
        assert ds[0]["video_grid_thw"][0, 0].item() == -(-n_frames // 2)  # last frame repeated to fill a step


def test_video_pixel_bounds_and_no_decode_at_build_time(tmp_path, processor, monkeypatch):
    import omnitune.data.video as video

    v = mp4(tmp_path / "big.mp4", 20, 10, (320, 240))
    monkeypatch.setattr(video, "decode_frames", lambda *a: pytest.fail("decoded at build time"))
    ds = build(tmp_path, [{"messages": _turns("<video>?", "!"), "videos": [v]}], processor,
               pre={**PIX, "video_max_pixels": 112 * 84})
    t, h, w = ds.media[0].video_grids[0]
    assert (t, h * 14 * w * 14 <= 112 * 84) == (2, True) and h * w > 0
    monkeypatch.undo()
    assert ds[0]["video_grid_thw"].tolist() == [[t, h, w]]


def test_resample_and_load_audio(tmp_path):
    for rate in (8000, 22050, 44100):
        x = load_audio(str(tmp_path / wav(tmp_path / f"a{rate}.wav", 1.0, rate, channels=2, freq=1000)),
                       "w", 16000)
        assert abs(len(x) - 16000) <= 1
        spectrum = np.abs(np.fft.rfft(x))
        assert abs(np.argmax(spectrum) * 16000 / len(x) - 1000) < 5   # the tone survives at its frequency
    same = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert resample(same, 16000, 16000) is not None and np.array_equal(resample(same, 16000, 16000), same)


def test_media_bad_inputs(tmp_path, processor):
    good = mp4(tmp_path / "good.mp4", 20, 10)
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.mp4").write_text("not a video")
    text = {"messages": _turns("q", "a")}
    d = r"d\.json: sample 1"
    cases = [
        ({"videos": ["trunc.mp4"], "messages": _turns("<video>q", "a")},
         rf"{d}: video .*trunc\.mp4 cannot be opened .*truncated"),
        ({"videos": ["text.mp4"], "messages": _turns("<video>q", "a")}, rf"{d}: video .*text\.mp4 cannot be opened"),
        ({"videos": ["nope.mp4"], "messages": _turns("<video>q", "a")}, rf"{d}: video file not found: .*nope\.mp4"),
        ({"videos": [good, good], "messages": _turns("<video>q", "a")}, rf"{d}: 1 <video> tag\(s\) but 2 video\(s\)"),
        ({"videos": [good], "messages": _turns("<video><video>q", "a")}, rf"{d}: 2 <video> tag\(s\) but 1 video\(s\)"),
        ({"messages": _turns("<video>q", "a")}, rf"{d}: 1 <video> tag\(s\) but 0 video\(s\)"),
        ({"videos": [good], "messages": _turns("q", "<video>a")}, rf"{d}: turn 1 \(assistant\) contains <video>"),
        ({"messages": _turns("q <|video_pad|>", "a")}, rf"{d}: turn 0 contains the reserved token <\|video_pad\|>"),
        ({"audios": ["x.wav"], "messages": _turns("<audio>q", "a")},
         rf"{d}: has 1 audio\(s\) but template 'qwen2vl' takes no audio"),
    ]
    for bad, match in cases:
        with pytest.raises(DataError, match=match):
            ds = build(tmp_path, [text, bad], processor)
            for i in range(len(ds)):
                ds[i]


def test_video_at_the_end_past_cutoff_is_dropped_and_counted(tmp_path, processor):
    v = mp4(tmp_path / "v.mp4", 30, 10)
    long_text = " ".join(["word"] * 150)
    samples = [{"messages": _turns(long_text + " <video>", "ok"), "videos": [v]},
               {"messages": _turns("short", "fine")}]
    ds = build(tmp_path, samples, processor, seq=120)
    assert (len(ds), ds.num_dropped_media, ds.num_truncated) == (1, 1, 0)
    assert not ds.media[0].videos


def test_collator_mixes_image_video_audio_and_text_only_items(tmp_path, processor):
    from omnitune.data import Collator

    a, v = jpeg(tmp_path / "a.jpg"), mp4(tmp_path / "v.mp4", 20, 10)
    samples = [{"messages": _turns("<video>x", "y"), "videos": [v]},
               {"messages": _turns("a text-only question that is longer", "and its answer")},
               {"messages": _turns("<image>z", "w"), "images": [a]},
               {"messages": _turns("<image><video>both", "ok"), "images": [a], "videos": [v]}]
    ds = build(tmp_path, samples, processor)
    items = [ds[i] for i in range(4)]
    # audio items as the Omni datasets produce them: features trimmed to their valid frames
    items[1] = {**items[1], "input_features": torch.randn(2, 128, 7), "feature_attention_mask": torch.ones(2, 7)}
    items[2] = {**items[2], "input_features": torch.randn(1, 128, 11), "feature_attention_mask": torch.ones(1, 11)}
    pad = processor.tokenizer.pad_token_id
    batch = Collator(pad)(items)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "mm_token_type_ids", "num_tokens", "pixel_values",
                          "image_grid_thw", "pixel_values_videos", "video_grid_thw", "input_features",
                          "feature_attention_mask"}
    n = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["mm_token_type_ids"].shape == (4, n)
    assert torch.equal(batch["pixel_values_videos"],
                       torch.cat([items[0]["pixel_values_videos"], items[3]["pixel_values_videos"]]))
    assert torch.equal(batch["video_grid_thw"], torch.cat([items[0]["video_grid_thw"], items[3]["video_grid_thw"]]))
    assert torch.equal(batch["pixel_values"], torch.cat([items[2]["pixel_values"], items[3]["pixel_values"]]))
    assert batch["input_features"].shape == (3, 128, 11)
    assert torch.equal(batch["input_features"][:2, :, :7], items[1]["input_features"])
    assert (batch["input_features"][:2, :, 7:] == 0).all()
    assert batch["feature_attention_mask"].tolist() == [[1] * 7 + [0] * 4] * 2 + [[1] * 11]
    assert int((batch["mm_token_type_ids"] == 2).sum()) == int(batch["video_grid_thw"].prod(-1).sum()) // 4
    text_only = Collator(pad)([items[1] | {}, ds[1]])
    assert "pixel_values_videos" not in text_only and "pixel_values" not in text_only


def test_preference_pairs_share_the_prompt_and_media(tmp_path, processor):
    from omnitune.data import Collator

    a = jpeg(tmp_path / "a.jpg")
    attr = {"images": "images", "messages": "conversations", "role_tag": "from", "content_tag": "value",
            "user_tag": "human", "assistant_tag": "gpt", "ranking": True, "chosen": "chosen", "rejected": "rejected"}
    prompt = [{"from": "human", "value": "<image>What is it?"}]
    pairs = [{"conversations": prompt, "images": [a], "chosen": {"from": "gpt", "value": "Noise."},
              "rejected": {"from": "gpt", "value": "A cat, clearly."}},
             {"conversations": [{"from": "human", "value": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}]
    ds = build(tmp_path, pairs, processor, attr=attr)
    sft_attr = {k: v for k, v in attr.items() if k not in ("ranking", "chosen", "rejected")}
    for k, side, answer in [(0, "chosen", "Noise."), (0, "rejected", "A cat, clearly."), (1, "rejected", "Go away.")]:
        conv = pairs[k]["conversations"] + [{"from": "gpt", "value": answer}]
        sft_sample = {"conversations": conv, "images": pairs[k].get("images", [])}
        sft = build_train_dataset(load_data_config(write_config(tmp_path, [sft_sample], attr=sft_attr, pre=PIX,
                                                                name="sft.json")), processor, 4096)[0]
        assert torch.equal(ds[k][f"{side}_input_ids"], sft["input_ids"])
        assert torch.equal(ds[k][f"{side}_labels"], sft["labels"])
        assert trained_texts(processor.tokenizer, ds[k][f"{side}_input_ids"], ds[k][f"{side}_labels"]) == \
            [answer + "<|im_end|>\n"]
    c, r = ds[0]["chosen_input_ids"], ds[0]["rejected_input_ids"]
    shared = int((c[:min(len(c), len(r))] == r[:min(len(c), len(r))]).cumprod(0).sum())
    assert processor.tokenizer.decode(c[shared:]) == "Noise.<|im_end|>\n"
    batch = Collator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4
    assert torch.equal(batch["input_ids"][2, :len(r)], r)
    assert torch.equal(batch["pixel_values"], torch.cat([ds[0]["pixel_values"]] * 2))  # one copy per row with it
    bad = dict(pairs[1], rejected={"from": "human", "value": "x"})
    with pytest.raises(DataError, match=r"d\.json: sample 1: 'rejected' has role 'human'; expected 'gpt'"):
        build(tmp_path, [pairs[0], bad], processor, attr=attr)
    with pytest.raises(DataError, match=r"d\.json: sample 0: the chosen answer 'chosen' is missing"):
        build(tmp_path, [{"conversations": prompt, "images": [a], "rejected": "x"}], processor, attr=attr)
    with pytest.raises(DataError, match=r"sample 0: a preference .* must end with a user turn"):
        build(tmp_path, [{"conversations": prompt + [{"from": "gpt", "value": "x"}], "images": [a],
                          "chosen": "a", "rejected": "b"}], processor, attr=attr)


@pytest.fixture(scope="module")
def omni_processor(tiny_model_dir):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny_model_dir("qwen2_5_omni"))


def test_audio_bad_inputs(tmp_path, omni_processor):
    import soundfile as sf

    good = wav(tmp_path / "good.wav", 0.5)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0), 16000)
    sf.write(str(tmp_path / "empty44.wav"), np.zeros(0), 44100)
    sf.write(str(tmp_path / "blip.wav"), np.zeros(100), 16000)
    (tmp_path / "text.wav").write_text("not audio")
    silent = mp4(tmp_path / "silent.mp4", 20, 10)
    text = {"messages": _turns("q", "a")}
    d = r"d\.json: sample 1"
    cases = [
        ({"audios": ["empty.wav"], "messages": _turns("<audio>q", "a")},
         rf"{d}: audio .*empty\.wav has 0 samples at 16000 Hz, too short"),
        ({"audios": ["empty44.wav"], "messages": _turns("<audio>q", "a")},
         rf"{d}: audio .*empty44\.wav has 0 samples at 16000 Hz, too short"),
        ({"audios": ["blip.wav"], "messages": _turns("<audio>q", "a")}, rf"{d}: audio .*blip\.wav has 100 samples"),
        ({"audios": ["text.wav"], "messages": _turns("<audio>q", "a")}, rf"{d}: audio .*text\.wav cannot be read"),
        ({"audios": ["nope.wav"], "messages": _turns("<audio>q", "a")}, rf"{d}: audio file not found: .*nope\.wav"),
        ({"audios": [good, good], "messages": _turns("<audio>q", "a")}, rf"{d}: 1 <audio> tag\(s\) but 2 audio\(s\)"),
        ({"audios": [good], "messages": _turns("<audio>q<audio>", "a")}, rf"{d}: 2 <audio> tag\(s\) but 1 audio\(s\)"),
        ({"messages": _turns("<audio>q", "a")}, rf"{d}: 1 <audio> tag\(s\) but 0 audio\(s\)"),
        ({"messages": _turns("q <|AUDIO|>", "a")}, rf"{d}: turn 0 contains the reserved token <\|AUDIO\|>"),
    ]
    for bad, match in cases:
        with pytest.raises(DataError, match=match):
            ds = build(tmp_path, [text, bad], omni_processor, template="qwen2_omni")
            for i in range(len(ds)):
                ds[i]
    with pytest.raises(DataError, match=rf"{d}: video .*silent\.mp4 has no audio track but use_audio_in_video is true"):
        build(tmp_path, [text, {"videos": [silent], "messages": _turns("<video>q", "a")}], omni_processor,
              template="qwen2_omni", pre={**PIX, "use_audio_in_video": True})
    with pytest.raises(DataError, match=r"use_audio_in_video is true but template 'qwen2vl' has no audio"):
        build(tmp_path, [text], omni_processor, pre={**PIX, "use_audio_in_video": True})


def test_audio_at_the_end_past_cutoff_is_dropped_and_counted(tmp_path, omni_processor):
    a = wav(tmp_path / "a.wav", 2.0)
    long_text = " ".join(["word"] * 150)
    samples = [{"messages": _turns(long_text + " <audio>", "ok"), "audios": [a]},
               {"messages": _turns("<audio>short", "fine"), "audios": [a]}]
    ds = build(tmp_path, samples, omni_processor, seq=200, template="qwen2_omni")
    assert (len(ds), ds.num_dropped_media) == (1, 1)
    item = ds[0]
    assert item["input_features"].shape[0] == 1 and int((item["mm_token_type_ids"] == 3).sum()) == 50


def test_decode_tolerates_a_header_a_frame_high_but_not_a_truncated_stream(tmp_path):
    import dataclasses

    from omnitune.data.video import decode_frames, probe_video

    v = tmp_path / mp4(tmp_path / "v.mp4", 30, 10)
    info = probe_video(str(v), "d.json: sample 3", 2.0, 128)
    frames = decode_frames(info, "w")
    assert frames.shape == (len(info.indices), 64, 96, 3)
    high = dataclasses.replace(info, total_frames=31, indices=info.indices[:-1] + (30,))
    assert np.array_equal(decode_frames(high, "w")[-1], frames[-1])  # frame 30 does not exist: the last one
    cut = dataclasses.replace(info, total_frames=40, indices=info.indices[:-1] + (39,))
    with pytest.raises(DataError, match=r"d\.json: sample 3: video .*v\.mp4 decodes to 30 frames but its header "
                                        r"promises 40 \(truncated file\?\)"):
        decode_frames(cut, "d.json: sample 3")
