"""`omnitune demo` (what `make demo` runs): the whole flow on an embedded default.

1. build a tiny random Qwen2-VL HF folder offline (real Qwen tokenizer),
2. write data.json / model.json for the bundled sample data (images + text-only),
3. fine-tune with `omnitune train` (torchrun, FSDP2), saving a DCP checkpoint,
4. export to an HF folder, reload it with plain transformers, generate a reply.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def demo_configs(out: Path, hf_dir: Path) -> tuple[Path, Path]:
    from omnitune.data import demo_data_dir

    data_dir = demo_data_dir()
    data = {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {"model_name_or_path": str(hf_dir), "image_max_pixels": 112 * 112,
                                      "image_min_pixels": 28 * 28},
            "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(data_dir),
                                 "dataset": str(data_dir / "demo.json"), "cache_dir": str(out / "cache"),
                                 "max_samples": None},
            "attr": {"images": "images", "messages": "messages", "role_tag": "role", "content_tag": "content",
                     "user_tag": "user", "assistant_tag": "assistant"},
        },
        "dataloader_param": {"dataloader_mode": "sampler", "drop_last": True, "shuffle": True,
                             "sampler_type": "BaseRandomBatchSampler", "pin_memory": False,
                             "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True}},
    }
    model = {"model_id": "qwen2vl", "img_context_token_id": 151655, "video_token_id": 151656,
             "vision_start_token_id": 151652,
             "image_encoder": {"vision_encoder": {"freeze": False}, "vision_projector": {"freeze": False}},
             "text_decoder": {"freeze": False}}
    data_json, model_json = out / "data.json", out / "model.json"
    data_json.write_text(json.dumps(data, indent=2))
    model_json.write_text(json.dumps(model, indent=2))
    return data_json, model_json


def run_demo(out_dir: str, nproc: int = 1, train_iters: int = 80) -> int:
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from omnitune.cli.main import cmd_train
    from omnitune.checkpoint.export import export_hf
    from omnitune.data import demo_data_dir
    from omnitune.infer.generate import generate
    from omnitune.models.tiny import build_tiny_model

    t0 = time.time()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"== 1/4 tiny Qwen2-VL HF folder -> {out / 'tiny_qwen2vl'}", flush=True)
    hf_dir = build_tiny_model("qwen2_vl", out / "tiny_qwen2vl")
    data_json, model_json = demo_configs(out, hf_dir)
    save = out / "save_dir"
    print(f"== 2/4 fine-tune ({nproc} process(es), {train_iters} iterations) -> {save}", flush=True)
    rc = cmd_train([
        "--nproc-per-node", str(nproc), "--mm-data", str(data_json), "--mm-model", str(model_json),
        "--load", str(hf_dir), "--save", str(save), "--save-interval", str(train_iters),
        "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "512",
        "--lr", "5e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1",
        "--weight-decay", "0.0", "--clip-grad", "1.0", "--train-iters", str(train_iters), "--seed", "42",
        "--log-interval", "1", "--log-tps", "--no-load-optim", "--no-load-rng",
    ])
    if rc != 0:
        return rc
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    print(f"   loss {first:.3f} -> {last:.3f} over {len(metrics)} iterations", flush=True)
    export_dir = out / "hf_export"
    print(f"== 3/4 export -> {export_dir}", flush=True)
    export_hf(save, export_dir, hf_dir, overwrite=True)
    model = Qwen2VLForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32)
    AutoProcessor.from_pretrained(export_dir)
    print(f"   plain transformers loaded {type(model).__name__} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)", flush=True)
    sample = json.loads((demo_data_dir() / "demo.json").read_text())
    with_image = next(s for s in sample if s.get("images"))
    image = str(demo_data_dir() / with_image["images"][0])
    prompt = with_image["messages"][0]["content"].replace("<image>", "").strip()
    print(f"== 4/4 generate: image {Path(image).name}, prompt {prompt!r}", flush=True)
    reply = generate(export_dir, prompt, image, max_new_tokens=24)
    print(f"   reply   : {reply!r}\n   expected: {with_image['messages'][1]['content']!r}")
    ok = last < first
    print(f"== demo {'OK' if ok else 'FAILED (loss did not fall)'} in {time.time() - t0:.0f}s", flush=True)
    return 0 if ok else 1
