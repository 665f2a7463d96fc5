"""A deterministic mixed-length multimodal SFT dataset for benchmarks (bench/packing.py).

``make_mixed_dataset(root, n, seed)`` writes ``root/mixed.json`` (mllm format: images / messages /
role / content / user / assistant, as the bundled demo data) and ``root/images/*.jpg``:

- JPEG images of several sizes (sides from 56 to 336 px, independent width and height, smooth
  noise), so with ``image_max_pixels = 336*336`` an image is 4 .. 144 tokens;
- about a third image + text single-turn samples, a third text-only single-turn samples and a third
  multi-turn conversations of 2-4 user/assistant turns (half of them with an image in the first turn);
- a target total length per sample drawn log-uniformly from [min_tokens, max_tokens] (default
  30 .. 900): the answers get what the prompts, the image and the chat template leave, so both
  very short and long answers occur. Text is words of a fixed English list (nearly one Qwen token
  per word); the real token counts are what the omnitune dataset build measures.

Same (n, seed) -> byte-identical files. Run on its own to look at the samples:

    .venv/bin/python bench/mixed_data.py /tmp/mixed --n 64
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from it an be this are or which his her "
         "time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government "
         "number night point home water room mother area money story fact month lot right study book "
         "eye job word business issue side kind head house service friend father power hour game line "
         "end member law car city community name president team minute idea kid body information back "
         "parent face others level office door health person art war history party result change "
         "morning reason research girl guy moment air teacher force education red green blue small "
         "large old new good great high little long young different important early able bad last "
         "picture image color shape corner light dark bright round square circle tree river mountain "
         "cloud window table chair street garden bird dog cat horse boat train road bridge field").split()
SIDES = (56, 84, 112, 168, 224, 280, 336)
MAX_PIXELS, MIN_PIXELS = 336 * 336, 56 * 56
SYSTEM_TOKENS = 20        # qwen2vl default system block
TURN_TOKENS = 10          # user header + end + assistant header + end


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(n_words, 1))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + "." if len(words) > 1 else words[0].capitalize() + "."


def _text(rng: random.Random, n_tokens: int) -> str:
    """About n_tokens Qwen tokens of sentences (a word is ~1 token, a full stop 1)."""
    out, left = [], max(n_tokens, 2)
    while left > 1:
        k = min(left - 1, rng.randint(5, 16))
        out.append(_sentence(rng, k))
        left -= k + 1
    return " ".join(out)


def _image(path: Path, w: int, h: int, nrng: np.random.Generator) -> None:
    from PIL import Image

    small = nrng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=85)


def _image_tokens(w: int, h: int) -> int:
    return (round(h / 28) or 1) * (round(w / 28) or 1) + 2   # pads + vision start/end (sides are multiples of 28)


def make_mixed_dataset(root: str | Path, n: int, seed: int = 0, min_tokens: int = 30,
                       max_tokens: int = 900) -> Path:
    """Write the dataset; returns the path of its JSON file. Existing files are overwritten."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    samples = []
    for i in range(n):
        kind = ("image", "text", "multi")[i % 3] if rng.random() < 0.85 else rng.choice(("image", "text", "multi"))
        target = int(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))
        turns = rng.randint(2, 4) if kind == "multi" else 1
        with_image = kind == "image" or (kind == "multi" and rng.random() < 0.5)
        budget = target - SYSTEM_TOKENS - TURN_TOKENS * turns
        sample = {}
        if with_image:
            w, h = rng.choice(SIDES), rng.choice(SIDES)
            name = f"images/{i:05d}_{w}x{h}.jpg"
            _image(root / name, w, h, nrng)
            sample["images"] = [name]
            budget -= _image_tokens(w, h)
        prompts = [rng.randint(4, 40) for _ in range(turns)]
        # shrink the prompts when the target is short, so the answers keep at least 3 tokens each
        while sum(prompts) > max(budget - 3 * turns, turns * 4) and max(prompts) > 4:
            prompts = [max(4, p // 2) for p in prompts]
        answer_total = max(budget - sum(prompts), 3 * turns)
        # answers: random split of the answer budget (Dirichlet-like), each >= 3 tokens
        cuts = sorted(rng.random() for _ in range(turns - 1))
        shares = [b - a for a, b in zip([0.0, *cuts], [*cuts, 1.0])]
        answers = [max(3, int(answer_total * s)) for s in shares]
        messages = []
        for t in range(turns):
            q = _text(rng, prompts[t])
            q = q[:-1] + "?"
            if t == 0 and with_image:
                q = "<image>" + ("\n" if rng.random() < 0.5 else "") + q
            messages.append({"role": "user", "content": q})
            messages.append({"role": "assistant", "content": _text(rng, answers[t])})
        sample["messages"] = messages
        samples.append(sample)
    out = root / "mixed.json"
    out.write_text(json.dumps(samples, indent=1))
    return out


def data_config(root: Path, dataset: Path, hf_dir: Path, cache_dir: Path, packing: bool = False) -> dict:
    """data.json for the dataset (the demo's keys, demo_configs; image pixel bounds of SIDES)."""
    return {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {"model_name_or_path": str(hf_dir), "image_max_pixels": MAX_PIXELS,
                                      "image_min_pixels": MIN_PIXELS},
            "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(root), "dataset": str(dataset),
                                 "cache_dir": str(cache_dir), "max_samples": None, "packing": packing},
            "attr": {"images": "images", "messages": "messages", "role_tag": "role", "content_tag": "content",
                     "user_tag": "user", "assistant_tag": "assistant"},
        },
        "dataloader_param": {"dataloader_mode": "sampler", "drop_last": True, "shuffle": True,
                             "sampler_type": "BaseRandomBatchSampler", "pin_memory": False,
                             "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True}},
    }


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=900)
    a = p.parse_args()
    path = make_mixed_dataset(a.root, a.n, a.seed, max_tokens=a.max_tokens)
    print(f"wrote {path} ({a.n} samples)")
