"""Test media written on the fly: PIL JPEGs, PyAV MP4s (optionally with an AAC track), soundfile
WAVs; and the HF reference (chat template + processor) for a normalized conversation."""
from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

MLLM_ATTR = {"images": "images", "videos": "videos", "audios": "audios", "messages": "messages",
             "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def jpeg(path: Path, size=(80, 64), seed=0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.name


def mp4(path: Path, n_frames=30, fps=10, size=(96, 64), seed=0, audio_rate: int | None = None) -> str:
    """An MPEG-4 video of moving bars (+ a 440 Hz tone track at ``audio_rate``)."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        a = None
        if audio_rate:
            a = c.add_stream("aac", rate=audio_rate)
            a.layout = "mono"
        for i in range(n_frames):
            img = base.copy()
            img[:, : (i * 7) % w] = (i * 13) % 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            t = np.arange(int(audio_rate * n_frames / fps)) / audio_rate
            sig = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
            for k in range(0, len(sig), 1024):
                fr = av.AudioFrame.from_ndarray(sig[None, k:k + 1024], format="flt", layout="mono")
                fr.sample_rate = audio_rate
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path.name


def wav(path: Path, seconds=1.0, rate=16000, channels=1, seed=0, freq=440.0) -> str:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(len(t))
    sf.write(str(path), np.stack([x] * channels, axis=1) if channels > 1 else x, rate)
    return path.name


def decode_all(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def sampled(path, video_fps=2.0, video_maxlen=128):
    """(frames, indices, native fps, duration) sampled as LLaMA-Factory / MindSpeed-MM sample."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        total, fps, duration = s.frames, float(s.average_rate), float(s.duration * s.time_base)
    n = min(total, video_maxlen, max(1, int(np.floor(duration * video_fps))))
    idx = np.linspace(0, total - 1, n).astype(np.int32)
    return decode_all(path)[idx], [int(i) for i in idx], fps, duration, total


def write_config(tmp: Path, samples, *, template="qwen2vl", pre=None, basic=None, attr=None, name="d.json") -> Path:
    f = tmp / name
    f.write_text(json.dumps(samples))
    cfg = {"dataset_param": {"preprocess_parameters": dict(pre or {}),
                             "basic_parameters": {"template": template, "dataset_dir": str(tmp), "dataset": name,
                                                  **(basic or {})},
                             "attr": MLLM_ATTR if attr is None else attr}}
    out = tmp / "data.json"
    out.write_text(json.dumps(cfg))
    return out


_TAG = re.compile(r"(<image>|<video>|<audio>)")


def hf_messages(messages):
    """Normalized messages -> HF chat-template messages (media placeholders become typed items)."""
    out = []
    for m in messages:
        if m["role"] == "user":
            content = []
            for part in _TAG.split(m["content"]):
                if part in ("<image>", "<video>", "<audio>"):
                    content.append({"type": part[1:-1]})
                elif part:
                    content.append({"type": "text", "text": part})
        else:
            content = [{"type": "text", "text": m["content"]}]
        out.append({"role": m["role"], "content": content})
    return out


def media_order(messages, use_audio_in_video: bool):
    """[("audio", i) / ("video", j)] in text order: the order of the audio streams in the sequence."""
    out, seen = [], {"<image>": 0, "<video>": 0, "<audio>": 0}
    for m in messages:
        for tag in _TAG.findall(m["content"]):
            if tag == "<audio>" or (tag == "<video>" and use_audio_in_video):
                out.append((tag[1:-1], seen[tag]))
            seen[tag] += 1
    return out
