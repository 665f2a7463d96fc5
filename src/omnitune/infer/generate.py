"""Greedy generation with a (fine-tuned, exported) HF folder: ``omnitune generate``."""
from __future__ import annotations

from pathlib import Path

import torch


def generate(model_dir: str | Path, prompt: str, image: str | None = None, max_new_tokens: int = 64) -> str:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (expected an HF folder, e.g. from omnitune export)")
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    model.eval()
    content = []
    images = None
    if image is not None:
        if not Path(image).is_file():
            raise FileNotFoundError(f"--image {image}: no such file")
        try:
            images = [Image.open(image).convert("RGB")]
        except Exception as e:  # PIL raises several types for bad files
            raise ValueError(f"--image {image}: cannot be decoded as an image ({e})") from None
        content.append({"type": "image"})
    content.append({"type": "text", "text": prompt})
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True)
