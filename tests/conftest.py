"""Shared fixtures: tiny random-weight HF model folders built offline once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL HF folder (random weights, real Qwen tokenizer and chat template)."""
    from omnitune.models.tiny import build_tiny_model

    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("models") / "tiny_qwen2vl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("qwen3_vl") -> Path`` of a tiny HF folder of that registry family
    (random weights, real Qwen tokenizer, the family's real chat template; Omni: the FULL model).
    Built once per family per session."""
    from omnitune.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("family_models")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_model(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def family_batch(tiny_model_dir, tmp_path_factory):
    """Factory: ``family_batch(family, n=2, modalities=("image", "video", "audio"), use_audio_in_video=False)``
    -> a padded batch made by the family's real HF processor from media written to disk (PIL JPEG,
    PyAV MP4, soundfile WAV), with ``labels`` (text tokens of the answer, -100 elsewhere). Keys are
    the processor's output names (+ labels, + use_audio_in_video when set)."""
    import av
    import numpy as np
    import soundfile as sf
    import torch
    from PIL import Image
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    media_dir = tmp_path_factory.mktemp("family_media")
    procs: dict = {}

    def media(patch: int, seed: int):
        rng = np.random.default_rng(seed)
        side, vside = patch * 8, patch * 4
        jpg, mp4, wav = (media_dir / f"{patch}_{seed}_{n}" for n in ("img.jpg", "clip.mp4", "sound.wav"))
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(jpg)
        with av.open(str(mp4), "w") as c:
            s = c.add_stream("mpeg4", rate=2)
            s.width = s.height = vside
            s.pix_fmt = "yuv420p"
            for _ in range(4):
                fr = av.VideoFrame.from_ndarray(rng.integers(0, 255, (vside, vside, 3), dtype=np.uint8),
                                                format="rgb24")
                for p in s.encode(fr):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        sf.write(wav, (rng.standard_normal(16000 + 1600 * seed) * 0.1).astype(np.float32), 16000)
        img = Image.open(jpg).convert("RGB")
        with av.open(str(mp4)) as c:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        meta = VideoMetadata(total_num_frames=len(frames), fps=2.0, width=vside, height=vside,
                             duration=len(frames) / 2.0, frames_indices=list(range(len(frames))))
        audio, _ = sf.read(wav, dtype="float32")
        return img, frames, meta, audio

    def make(family: str, n: int = 2, modalities=("image", "video", "audio"), use_audio_in_video: bool = False,
             seed: int = 0) -> dict:
        if family not in procs:
            procs[family] = AutoProcessor.from_pretrained(tiny_model_dir(family))
        proc = procs[family]
        omni = hasattr(proc, "feature_extractor")
        patch = proc.image_processor.patch_size
        texts, images, videos, metas, audios = [], [], [], [], []
        for i in range(n):
            img, frames, meta, audio = media(patch, seed * 10 + i)
            content = []
            if "image" in modalities:
                content.append({"type": "image", "image": "x.jpg"}); images.append(img)
            if "video" in modalities:
                content.append({"type": "video", "video": "x.mp4"}); videos.append(frames); metas.append(meta)
            if omni and ("audio" in modalities or use_audio_in_video):
                audios.append(audio)
                if "audio" in modalities and not use_audio_in_video:
                    content.append({"type": "audio", "audio": "x.wav"})
            content.append({"type": "text", "text": f"Question {i}: what is in it?" + " more" * (3 * i)})
            conv = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": f"Answer number {i}, a cat."}]}]
            texts.append(proc.apply_chat_template(conv, tokenize=False))
        kw = dict(text=texts, return_tensors="pt", padding=True)
        if images:
            kw["images"] = images
            kw["images_kwargs"] = {"size": {"shortest_edge": (patch * 8) ** 2, "longest_edge": (patch * 8) ** 2}}
        if videos:
            kw.update(videos=videos, video_metadata=metas)
            kw["videos_kwargs"] = {"size": {"shortest_edge": (patch * 4) ** 2, "longest_edge": (patch * 4) ** 2 * 4},
                                   "do_sample_frames": False}
        if audios:
            kw["audio"] = audios
        if use_audio_in_video:   # the audio track of video i is audios[i] (already decoded)
            kw.update(load_audio_from_video=True, audio_from_video_indices=list(range(n)))
        batch = dict(proc(**kw))
        if "input_features" in batch:   # drop the feature extractor's padding to its 300 s window
            frames = int(batch["feature_attention_mask"].sum(-1).max())
            batch["input_features"] = batch["input_features"][..., :frames].contiguous()
            batch["feature_attention_mask"] = batch["feature_attention_mask"][..., :frames].contiguous()
        ids = batch["input_ids"]
        # train on the answers: tokens after the last "<|im_start|>assistant\n"
        start = proc.tokenizer.convert_tokens_to_ids("<|im_start|>")
        labels = torch.full_like(ids, -100)
        for r in range(ids.shape[0]):
            pos = (ids[r] == start).nonzero().flatten()
            a = int(pos[-1]) + 3            # <|im_start|> assistant \n
            valid = batch["attention_mask"][r].bool()
            labels[r, a:] = ids[r, a:]
            labels[r, ~valid] = -100
        batch["labels"] = labels
        if use_audio_in_video:
            batch["use_audio_in_video"] = True
        return batch

    return make


@pytest.fixture(scope="module")
def processor(tiny_qwen2vl):
    """The tiny Qwen2-VL folder's processor (one per test module)."""
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny_qwen2vl)
