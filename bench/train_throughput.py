"""Training throughput: omnitune vs a plain transformers `Trainer` loop, measured in one run.

Same Qwen2-VL-shaped model (the "bench" size of the tiny builder, ~20-50M parameters, random
weights, real Qwen tokenizer), same tokenized samples (the bundled demo data), same micro/global
batch, fp32, AdamW, one process. Prints tokens/s of each and the ratio.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--mbs 4] [--gbs 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def omnitune_run(hf_dir: Path, out: Path, steps: int, mbs: int, gbs: int, seq: int) -> tuple[float, int]:
    from omnitune.cli.demo import demo_configs

    data_json, model_json = demo_configs(out, hf_dir)
    save = out / "omnitune_save"
    if save.exists():
        import shutil
        shutil.rmtree(save)
    cmd = [sys.executable, "-m", "omnitune.train", "--mm-data", str(data_json), "--mm-model", str(model_json),
           "--load", str(hf_dir), "--save", str(save), "--save-interval", str(10 ** 9),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--seq-length", str(seq),
           "--lr", "1e-4", "--lr-decay-style", "constant", "--clip-grad", "1.0", "--train-iters", str(steps),
           "--seed", "1", "--log-interval", "1", "--no-save-optim", "--no-save-rng"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    recs = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    timed = recs[2:]  # skip warm-up steps
    tokens = sum(r["tokens"] for r in timed)
    return tokens / sum(r["step_time"] for r in timed), int(tokens / len(timed))


def hf_trainer_run(hf_dir: Path, out: Path, steps: int, mbs: int, gbs: int, seq: int) -> tuple[float, int]:
    from transformers import (AutoProcessor, Qwen2VLForConditionalGeneration, Trainer, TrainerCallback,
                              TrainingArguments)

    from omnitune.cli.demo import demo_configs
    from omnitune.config.data import load_data_config
    from omnitune.data import Collator, build_train_dataset

    data_json, _ = demo_configs(out, hf_dir)
    processor = AutoProcessor.from_pretrained(hf_dir)
    ds = build_train_dataset(load_data_config(data_json), processor, seq)
    collate = Collator(processor.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")

    def hf_collate(items):
        b = collate(items)
        return {k: v for k, v in b.items() if k in keys}

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.times, self.tokens = None, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            timer.tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    timer = Timer()
    args = TrainingArguments(output_dir=str(out / "hf_trainer"), per_device_train_batch_size=mbs,
                             gradient_accumulation_steps=gbs // mbs, max_steps=steps, learning_rate=1e-4,
                             lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10 ** 9,
                             save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, seed=1)
    CountingTrainer(model=model, args=args, train_dataset=ds, data_collator=hf_collate,
                    callbacks=[timer]).train()
    acc = gbs // mbs
    step_tokens = [sum(timer.tokens[i * acc:(i + 1) * acc]) for i in range(len(timer.times))]
    t, n = sum(timer.times[2:]), sum(step_tokens[2:])
    return n / t, int(n / len(timer.times[2:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--out", default=str(REPO / "bench_out"))
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    from omnitune.models.tiny import build_tiny_model

    out = Path(a.out)
    hf_dir = build_tiny_model("qwen2_vl", out / "qwen2vl_bench", size="bench")
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration
    n_params = sum(p.numel() for p in Qwen2VLForConditionalGeneration._from_config(
        AutoConfig.from_pretrained(hf_dir)).parameters())
    print(f"model: Qwen2-VL-shaped, {n_params / 1e6:.1f}M parameters (tied 152k-row embedding), fp32, "
          f"{torch.get_num_threads()} threads; batch micro {a.mbs} / global {a.gbs}; {a.steps} steps, first 2 "
          f"not timed", flush=True)
    hf_tps, hf_tok = hf_trainer_run(hf_dir, out, a.steps, a.mbs, a.gbs, a.seq_length)
    print(f"transformers Trainer : {hf_tps:10.1f} tokens/s  ({hf_tok} tokens/step)", flush=True)
    om_tps, om_tok = omnitune_run(hf_dir, out, a.steps, a.mbs, a.gbs, a.seq_length)
    print(f"omnitune (FSDP2, 1p) : {om_tps:10.1f} tokens/s  ({om_tok} tokens/step)", flush=True)
    print(f"ratio omnitune / transformers Trainer: {om_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
