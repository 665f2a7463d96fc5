"""`omnitune demo` (what `make demo` runs): the whole flow on an embedded default, with a check.

1. build a tiny random Qwen2-VL HF folder offline (real Qwen tokenizer),
2. write data.json / model.json for the bundled sample data (images + text-only),
3. fine-tune with `omnitune train` (torchrun, FSDP2), saving a DCP checkpoint,
4. export to an HF folder, reload it with plain transformers and ask it every bundled question.

The demo passes only when every answer equals the bundled one ("demo OK: N/N answers correct");
otherwise it lists the wrong answers and exits 1, so a regression in training, export or
generation is loud. The bundled task (assets/demo_data/make_demo_data.py) is easy on purpose:
the tiny model learns it in a few dozen steps.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# One micro-batch of 16 per step: on a CPU the step time is mostly the vocabulary-sized work
# (embedding/lm_head gradients, AdamW over 10M parameters), not the number of samples, so a
# large batch and a high learning rate buy the fewest steps.
DEMO_TRAIN_ITERS = 150
DEMO_FLAGS = ["--micro-batch-size", "16", "--global-batch-size", "16", "--seq-length", "256",
              "--lr", "1e-2", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1",
              "--weight-decay", "0.0", "--clip-grad", "1.0", "--seed", "42"]


@dataclass
class Question:
    """One bundled question: the first user turn as in demo.json (``<image>`` placeholder
    included), its image if any, and the expected reply."""
    prompt: str
    image: str | None
    expected: str


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


def demo_questions() -> list[Question]:
    """Every distinct (prompt, image) of the bundled data with its expected answer."""
    from omnitune.data import demo_data_dir

    root = demo_data_dir()
    seen, out = set(), []
    for s in json.loads((root / "demo.json").read_text()):
        image = str(root / s["images"][0]) if s.get("images") else None
        prompt = s["messages"][0]["content"]
        if (prompt, image) not in seen:
            seen.add((prompt, image))
            out.append(Question(prompt, image, s["messages"][1]["content"].strip()))
    return out


def prompt_text(question: Question, template: str = "qwen2vl") -> str:
    """The question as training rendered it (data.json's template: system prompt, the image's
    place and the newline after it), up to the assistant header; the processor expands the one
    image pad token to the image's count. The model answers the prompts it was trained on."""
    from omnitune.data.templates import get_template, render

    t = get_template(template)
    segments = render(t, [{"role": "user", "content": question.prompt}, {"role": "assistant", "content": ""}],
                      [1] if question.image else [])
    return "".join(text for text, _ in segments[:-1])


def answer_questions(model_dir: str | Path, questions: list[Question], max_new_tokens: int = 12) -> list[str]:
    """Greedy replies of the HF folder ``model_dir`` (loaded once with plain transformers)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        trust_remote_code=False).eval()
    replies = []
    for q in questions:
        text = prompt_text(q)
        images = [Image.open(q.image).convert("RGB")] if q.image else None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        replies.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def check_answers(model_dir: str | Path, questions: list[Question] | None = None) -> tuple[int, list[str]]:
    """(number correct, one line per wrong answer) for the bundled questions."""
    questions = demo_questions() if questions is None else questions
    replies = answer_questions(model_dir, questions)
    wrong = [f"{Path(q.image).name if q.image else '(text only)'} {q.prompt.replace('<image>', '').strip()!r}: "
             f"got {r!r}, expected {q.expected!r}"
             for q, r in zip(questions, replies) if r != q.expected]
    return len(questions) - len(wrong), wrong


def report_check(model_dir: str | Path, questions: list[Question] | None = None) -> bool:
    """Print the check's verdict; True when every (bundled) question is answered correctly."""
    questions = demo_questions() if questions is None else questions
    n = len(questions)
    correct, wrong = check_answers(model_dir, questions)
    if wrong:
        print(f"== demo FAILED: {correct}/{n} answers correct; wrong:", file=sys.stderr)
        for line in wrong:
            print(f"   {line}", file=sys.stderr)
        return False
    print(f"== demo OK: {correct}/{n} answers correct", flush=True)
    return True


def run_demo(out_dir: str, nproc: int = 1, train_iters: int = DEMO_TRAIN_ITERS) -> int:
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from omnitune.cli.main import cmd_train
    from omnitune.checkpoint.export import export_hf
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
        *DEMO_FLAGS, "--train-iters", str(train_iters),
        "--log-interval", "10", "--log-tps", "--no-load-optim", "--no-load-rng",
    ])
    if rc != 0:
        return rc
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "loss" in m]
    print(f"   loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f} over {len(metrics)} iterations",
          flush=True)
    export_dir = out / "hf_export"
    print(f"== 3/4 export -> {export_dir}", flush=True)
    export_hf(save, export_dir, hf_dir, overwrite=True)
    model = Qwen2VLForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32)
    AutoProcessor.from_pretrained(export_dir)
    print(f"   plain transformers loaded {type(model).__name__} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)", flush=True)
    del model
    print(f"== 4/4 generate: {len(demo_questions())} bundled questions (greedy)", flush=True)
    ok = report_check(export_dir)
    print(f"   {time.time() - t0:.0f}s in all", flush=True)
    return 0 if ok else 1
