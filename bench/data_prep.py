"""Data preparation throughput: dataset build + one pass of iteration, with 1 and 2 workers, cold
and warm preprocessing cache, measured side by side in one run. Not a test.

Synthetic data: --n samples (default 2,000), each a short conversation with one smooth-noise JPEG
of a random size (64..320 px a side); plus --n-video MP4 (PyAV, 16 frames at 8 fps) and --n-audio
WAV (soundfile, 2 s at 16 kHz) samples. Processor and template: the tiny Qwen2.5-Omni folder
(real Qwen tokenizer; its processor reads images, videos and audio), template qwen2_omni; when this
version has no qwen2_omni template yet, the tiny Qwen2-VL folder and qwen2vl (audio samples skipped).

"1 worker" = everything in the main process (preprocessing_num_workers 1, DataLoader num_workers 0);
"2 workers" = preprocessing_num_workers 2 and DataLoader num_workers 2. "cold" builds into an empty
cache_dir; "warm" is the next build with the same inputs (the cache entry is loaded). Iteration =
every item decoded, patchified and collated in micro-batches of 4.

    PYTHONPATH=src .venv/bin/python bench/data_prep.py [--n 2000] [--out /tmp/omnitune_data_prep]

Runtime on 2 shared CPU cores: about 1-2 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, n: int, rng) -> list[str]:
    from PIL import Image
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(64, 321, 2))
        # smooth noise compresses like a photo more than white noise does
        small = rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(root / "images" / f"{i:05d}.jpg", quality=85)
        names.append(f"images/{i:05d}.jpg")
    return names


def make_videos(root: Path, n: int, rng) -> list[str]:
    import av
    (root / "videos").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        path = root / "videos" / f"{i:04d}.mp4"
        with av.open(str(path), "w") as out:
            s = out.add_stream("mpeg4", rate=8)
            s.width, s.height, s.pix_fmt = 112, 84, "yuv420p"
            for _ in range(16):
                img = rng.integers(0, 255, (84, 112, 3), dtype=np.uint8)
                for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(pkt)
            for pkt in s.encode():
                out.mux(pkt)
        names.append(f"videos/{i:04d}.mp4")
    return names


def make_audios(root: Path, n: int, rng) -> list[str]:
    import soundfile as sf
    (root / "audios").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        sf.write(root / "audios" / f"{i:04d}.wav", rng.standard_normal(16000 * 2).astype(np.float32) * 0.1, 16000)
        names.append(f"audios/{i:04d}.wav")
    return names


def pick_family() -> tuple[str, str]:
    """(tiny-model family, template): Qwen2.5-Omni when its template exists here, else Qwen2-VL."""
    from omnitune.data.templates import TEMPLATES
    return ("qwen2_5_omni", "qwen2_omni") if "qwen2_omni" in TEMPLATES else ("qwen2_vl", "qwen2vl")


TEMPLATE = pick_family()[1]


def media_supported(kind: str, processor) -> bool:
    """Whether this version's data.json validation accepts the ``kind`` column (videos / audios)."""
    from omnitune.config.data import DataConfig, unsupported_features
    cfg = DataConfig.model_validate({"dataset_param": {"basic_parameters": {"dataset": "x.json", "template": TEMPLATE},
                                                       "attr": {kind: kind}}})
    reader = {"videos": "video_processor", "audios": "feature_extractor"}[kind]
    return getattr(processor, reader, None) is not None and \
        not any(f"attr.{kind}" in p for p in unsupported_features(cfg))


def write_dataset(root: Path, args, rng, hf_dir: Path, processor) -> tuple[dict, dict]:
    images = make_images(root, args.n, rng)
    words = "the a red blue square circle small large noise picture shows left right top bottom".split()
    samples = []
    for i, img in enumerate(images):
        q = " ".join(rng.choice(words, int(rng.integers(3, 20))))
        a = " ".join(rng.choice(words, int(rng.integers(5, 60))))
        samples.append({"images": [img], "messages": [{"role": "user", "content": f"<image>{q}?"},
                                                      {"role": "assistant", "content": a + "."}]})
    counts = {"image": len(images)}
    attr = {"images": "images", "messages": "messages", "role_tag": "role", "content_tag": "content",
            "user_tag": "user", "assistant_tag": "assistant"}
    for kind, make, n in (("videos", make_videos, args.n_video), ("audios", make_audios, args.n_audio)):
        if not n:
            continue
        if not media_supported(kind, processor):
            print(f"note: {kind} are not supported with template {TEMPLATE} in this version: "
                  f"{n} {kind[:-1]} samples skipped")
            continue
        tag = "<" + kind[:-1] + ">"
        for name in make(root, n, rng):
            samples.append({kind: [name], "messages": [{"role": "user", "content": f"{tag}What happens?"},
                                                       {"role": "assistant", "content": "Noise flickers."}]})
        attr[kind] = kind
        counts[kind[:-1]] = n
    (root / "data.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    cfg = {"dataset_param": {
        "preprocess_parameters": {"model_name_or_path": str(hf_dir), "image_min_pixels": 28 * 28,
                                  "image_max_pixels": 256 * 256, "video_min_pixels": 28 * 28,
                                  "video_max_pixels": 84 * 112, "video_fps": 2.0},
        "basic_parameters": {"template": TEMPLATE, "dataset_dir": str(root), "dataset": "data.jsonl",
                             "cache_dir": None, "preprocessing_batch_size": 250},
        "attr": attr}}
    return cfg, counts


def measure(cfg: dict, processor, workers: int, cache_dir: Path, mbs: int) -> dict:
    from torch.utils.data import DataLoader

    from omnitune.config.data import DataConfig
    from omnitune.data import Collator, build_train_dataset

    c = json.loads(json.dumps(cfg))
    c["dataset_param"]["basic_parameters"].update(cache_dir=str(cache_dir), preprocessing_num_workers=workers)
    data_cfg = DataConfig.model_validate(c)
    t0 = time.perf_counter()
    ds = build_train_dataset(data_cfg, processor, 4096)
    t_build = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=mbs, shuffle=False, num_workers=0 if workers == 1 else workers,
                        collate_fn=Collator(processor.tokenizer.pad_token_id))
    t0 = time.perf_counter()
    n = sum(len(b["input_ids"]) for b in loader)
    t_iter = time.perf_counter() - t0
    assert n == len(ds)
    return {"n": len(ds), "build": t_build, "iter": t_iter}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="image samples")
    ap.add_argument("--n-video", type=int, default=40)
    ap.add_argument("--n-audio", type=int, default=40)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--out", default=None, help="work folder (default: a temp folder, removed at the end)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from transformers import AutoProcessor

    from omnitune.models.tiny import build_tiny_model

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="omnitune_data_prep_"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    family = pick_family()[0]
    hf_dir = build_tiny_model(family, out / f"tiny_{family}")
    processor = AutoProcessor.from_pretrained(hf_dir)
    rng = np.random.default_rng(0)
    data_root = out / "data"
    if data_root.exists():
        shutil.rmtree(data_root)
    t0 = time.perf_counter()
    cfg, counts = write_dataset(data_root, args, rng, hf_dir, processor)
    print(f"synthetic data: {counts} samples written in {time.perf_counter() - t0:.1f} s "
          f"({os.cpu_count()} CPUs visible; shared machines make single figures noisy, ratios less so)")

    results = {}
    for workers in (1, 2):
        cache = out / f"cache_w{workers}"
        if cache.exists():
            shutil.rmtree(cache)
        results[(workers, "cold")] = measure(cfg, processor, workers, cache, args.mbs)
        results[(workers, "warm")] = measure(cfg, processor, workers, cache, args.mbs)

    def rate(r, part):
        t = r["build"] + r["iter"] if part == "total" else r[part]
        return r["n"] / t

    print(f"\n{'workers':>7} {'cache':>5} | {'build s/s':>10} {'iterate s/s':>12} {'build+iterate s/s':>18} "
          f"| {'build s':>7} {'iterate s':>9}")
    for (w, c), r in results.items():
        print(f"{w:>7} {c:>5} | {rate(r, 'build'):>10.0f} {rate(r, 'iter'):>12.0f} {rate(r, 'total'):>18.0f} "
              f"| {r['build']:>7.2f} {r['iter']:>9.2f}")
    print("\nratios (higher = faster)")
    for c in ("cold", "warm"):
        a, b = results[(1, c)], results[(2, c)]
        print(f"  2 vs 1 workers, {c:4} cache : build x{rate(b, 'build') / rate(a, 'build'):.2f}   iterate "
              f"x{rate(b, 'iter') / rate(a, 'iter'):.2f}   build+iterate x{rate(b, 'total') / rate(a, 'total'):.2f}")
    for w in (1, 2):
        a, b = results[(w, "cold")], results[(w, "warm")]
        print(f"  warm vs cold, {w} worker(s)  : build x{rate(b, 'build') / rate(a, 'build'):.1f}   "
              f"build+iterate x{rate(b, 'total') / rate(a, 'total'):.2f}")
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
