"""Sequence packing: omnitune padded vs packed vs a plain transformers `Trainer` loop, one run.

Reproduce (from the repo root; first run builds the model and data under --out, later runs reuse them):

    .venv/bin/python bench/packing.py                      # 3 interleaved rounds, all cores
    .venv/bin/python bench/packing.py --quick --threads 1  # smoke test, ~2 min (overrides the sizes:
                                                           # 1 round, 3 steps, batch 2/2, 6 samples <= 400
                                                           # tokens, rows of 512)

Runtime: each run is one process that loads the model (~15 s) and trains ~48 samples of ~300 tokens
at 40-90 tokens/s on 2 CPU cores, so a round is several minutes and the default 3 rounds roughly half
an hour (estimated from --quick figures; --rounds 1 or fewer --steps for less).

What runs, each in its own process, interleaved (round 1: Trainer, omnitune padded, omnitune packed;
round 2: the same ...), so a neighbour's load hits all three alike; best-of and median over rounds:

- model: a "bench-medium" Qwen2-VL-shaped random-weight HF folder built here (text hidden 512 x 8
  layers, 8 heads / 2 kv heads, MLP 2048; vision depth 4 x 256; the real 152k Qwen vocabulary and
  tokenizer, tied embedding), fp32 (plus bf16 when lscpu shows avx512_bf16 or amx);
- data: bench/mixed_data.py, generated here and seeded: images of 56..336 px a side (4..144
  tokens), image+text, text-only and 2-4 turn conversations, 30..900 tokens per sample; exactly
  steps x global-batch samples, so a padded run trains every sample once;
- (a) transformers Trainer, padded micro-batches (omnitune's dataset and collator, the model class
  from_pretrained, AdamW, clip 1.0), fed the samples in omnitune's sampler order, so its
  micro-batches are omnitune's; (b) `python -m omnitune.train` padded (one process); (c) the same
  command with data.json ``basic_parameters.packing: true``, ``--micro-batch-size 1`` packed row of
  ``--seq-length`` = --pack-length tokens, and as many rows per step as hold about the padded
  run's samples per step. Until omnitune accepts packing this prints "packed: not available in
  this checkout" (probed with --dry-run) and carries on.

Figures:
- tokens/s: real (unpadded) tokens of the timed steps / their wall time (the first --warmup steps
  not timed). A step's time includes fetching its micro-batches in both loops (Trainer: the time
  between consecutive on_step_end callbacks; omnitune: metrics.jsonl step_time, tokens = the
  attention mask's sum);
- pad per token: padding tokens / real tokens. Padded: sum over the epoch's micro-batches (this
  sampler order) of rows x longest row - real tokens, which is what the collator builds. Packed:
  rows filled next-fit in the same order up to --pack-length; "pad to capacity" counts every row
  as --pack-length long (fixed-shape rows), one row per micro-batch otherwise needs no padding;
- model FLOP/s = tokens/s x useful FLOPs per token, where a sample's FLOPs are
  6 N_text S + 12 L H S^2 (text decoder + tied lm_head: 6N per token plus attention 12 L H S per
  token with S the token's own sample length, PaLM's formula, no causal halving, no padding, no
  recompute) + 6 N_vit P + 12 L_v H_v sum(p^2) over its images (ViT blocks on its P patches, p per
  image) + 6 N_merger P/4. As a % of the matmul peak measured in the same run: best of several
  torch.mm of 2048 x 2048, same dtype and thread count, in every round;
- peak RSS: each run's process (os.wait4 ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

MEDIUM = dict(hidden=512, inter=2048, layers=8, heads=8, kv=2, vdepth=4, vdim=256, vheads=4)
SEED = 1   # omnitune --seed (its sampler order) and the Trainer's seed


# ------------------------------------------------------------------------------------------ model
def build_medium_model(out: Path, seed: int = 0) -> Path:
    """Random-weight Qwen2-VL HF folder of MEDIUM sizes (tiny.py's approach, larger config)."""
    from transformers import AutoConfig

    if (out / "config.json").is_file():
        c = AutoConfig.from_pretrained(out)
        if (c.text_config.hidden_size, c.text_config.num_hidden_layers, c.vision_config.depth,
                c.vision_config.embed_dim) == (MEDIUM["hidden"], MEDIUM["layers"], MEDIUM["vdepth"], MEDIUM["vdim"]):
            return out
        shutil.rmtree(out)
    import torch

    from omnitune.fsutil import atomic_dir
    from omnitune.models.registry import get_family
    from omnitune.models.tiny import load_qwen_tokenizer

    s = MEDIUM
    fam = get_family("qwen2_vl")
    base = fam.tiny_folder_config("bench")
    d = base.to_dict()
    head_dim = s["hidden"] // s["heads"]
    half = head_dim // 2
    q = half // 4
    t, v = d["text_config"], d["vision_config"]
    t.update(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
             num_attention_heads=s["heads"], num_key_value_heads=s["kv"], layer_types=["full_attention"] * s["layers"],
             rope_parameters={**t["rope_parameters"],   # sections sum to head_dim / 2, as tiny_config's
                              "mrope_section": [q, (half - q) // 2, half - q - (half - q) // 2]})
    v.update(depth=s["vdepth"], embed_dim=s["vdim"], num_heads=s["vheads"], hidden_size=s["hidden"])
    config = type(base).from_dict(d)
    with atomic_dir(out) as tmp:
        torch.manual_seed(seed)
        model = fam.folder_class()(config)
        fam.init_tiny_model(model, torch.Generator().manual_seed(seed))
        for k, val in model.state_dict().items():
            if val.is_floating_point() and not torch.isfinite(val).all():
                raise RuntimeError(f"medium model: tensor {k} is not finite after initialisation")
        fam.build_processor(load_qwen_tokenizer).save_pretrained(tmp)
        model.save_pretrained(tmp)
    return out


def param_counts(hf_dir: Path) -> dict:
    """Unique parameter counts (tied weights once): text (decoder + lm_head), ViT blocks + patch embed, merger."""
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        m = Qwen2VLForConditionalGeneration._from_config(cfg)
    seen, total = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    merger = sum(p.numel() for p in m.model.visual.merger.parameters())
    vit = sum(p.numel() for p in m.model.visual.parameters()) - merger
    t, v = cfg.text_config, cfg.vision_config
    return {"total": total, "text": total - vit - merger, "vit": vit, "merger": merger,
            "L": t.num_hidden_layers, "H": t.hidden_size, "Lv": v.depth, "Hv": v.embed_dim,
            "heads": t.num_attention_heads, "kv": t.num_key_value_heads, "inter": t.intermediate_size,
            "vocab": t.vocab_size}


# ------------------------------------------------------------------------------------------ data
def write_configs(out: Path, hf_dir: Path, n: int, seed: int, max_tokens: int) -> tuple[Path, Path, Path]:
    from mixed_data import data_config, make_mixed_dataset

    root = out / "mixed_data"
    stamp = root / f".made_{n}_{seed}_{max_tokens}"
    if not stamp.is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_mixed_dataset(root, n, seed, max_tokens=max_tokens)
        stamp.touch()
    dataset = root / "mixed.json"
    padded, packed = out / "data_padded.json", out / "data_packed.json"
    for path, pack in ((padded, False), (packed, True)):
        path.write_text(json.dumps(data_config(root, dataset, hf_dir, out / "cache", packing=pack), indent=2))
    model = {"model_id": "qwen2vl", "img_context_token_id": 151655, "video_token_id": 151656,
             "vision_start_token_id": 151652,
             "image_encoder": {"vision_encoder": {"freeze": False}, "vision_projector": {"freeze": False}},
             "text_decoder": {"freeze": False}}
    model_json = out / "model.json"
    model_json.write_text(json.dumps(model, indent=2))
    return padded, packed, model_json


def load_dataset(data_json: Path, hf_dir: Path, seq: int):
    from transformers import AutoProcessor

    from omnitune.config.data import load_data_config
    from omnitune.data import build_train_dataset

    processor = AutoProcessor.from_pretrained(hf_dir)
    return build_train_dataset(load_data_config(data_json), processor, seq), processor


def sample_stats(ds) -> list[dict]:
    """Per sample: length, trained tokens, image patches, per-image patches, turns."""
    import numpy as np

    out = []
    for i, meta in enumerate(ds.media):
        a, b = int(ds.offsets[i]), int(ds.offsets[i + 1])
        patches = [t * h * w for t, h, w in meta.image_grids]
        out.append({"len": b - a, "trained": int((np.asarray(ds.labels[a + 1:b]) != -100).sum()),
                    "patches": sum(patches), "per_image": patches})
    return out


def sampler_order(n: int, seed: int) -> list[int]:
    """Epoch 0 of omnitune's MicroBatchSampler (shuffle on): its micro-batches are consecutive slices."""
    from omnitune.data import MicroBatchSampler

    return MicroBatchSampler(n, 1, 1, 0, 1, shuffle=True, seed=seed).epoch_order(0).tolist()


def padded_stats(lengths: list[int], order: list[int], mbs: int) -> tuple[int, int]:
    """(real tokens, padding tokens) of the padded micro-batches in ``order``."""
    real = pad = 0
    for k in range(0, len(order) - mbs + 1, mbs):
        ls = [lengths[i] for i in order[k:k + mbs]]
        real += sum(ls)
        pad += len(ls) * max(ls) - sum(ls)
    return real, pad


def pack_next_fit(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Rows filled in ``order``, a new row when the next sample does not fit (streaming-style)."""
    rows, cur, fill = [], [], 0
    for i in order:
        if cur and fill + lengths[i] > capacity:
            rows.append(cur)
            cur, fill = [], 0
        cur.append(i)
        fill += lengths[i]
    if cur:
        rows.append(cur)
    return rows


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows by best-fit decreasing (longest sample first, into the fullest row it fits): how the map-style
    packer of omnitune's packing work packs, per its design notes; the bench's own copy."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: room[r])
            rows[r].append(i)
            room[r] -= lengths[i]
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def sample_flops(s: dict, pc: dict) -> float:
    """Useful training FLOPs of one sample (module docstring)."""
    S, P = s["len"], s["patches"]
    return (6 * pc["text"] * S + 12 * pc["L"] * pc["H"] * S * S
            + 6 * pc["vit"] * P + 12 * pc["Lv"] * pc["Hv"] * sum(p * p for p in s["per_image"])
            + 6 * pc["merger"] * P / 4)


# ------------------------------------------------------------------------------------------ machine
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of torch.mm(n x n, n x n) over ``reps`` timings (this process's thread count)."""
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# ------------------------------------------------------------------------------------------ runs
def run_child(cmd: list[str], env: dict, log: Path) -> tuple[int, float, str]:
    """(exit code, peak RSS MiB, last stderr lines) of one child process; killed if this one is interrupted."""
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
    tail = log.with_suffix(".err").read_text().strip().splitlines()[-3:]
    return p.returncode, usage.ru_maxrss / 1024, "\n".join(tail)


def omnitune_cmd(data_json: Path, model_json: Path, hf_dir: Path, save: Path, steps: int, mbs: int, gbs: int,
                 seq: int, bf16: bool) -> list[str]:
    return [sys.executable, "-m", "omnitune.train", "--mm-data", str(data_json), "--mm-model", str(model_json),
            "--load", str(hf_dir), "--save", str(save), "--save-interval", str(10 ** 9),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--seq-length", str(seq),
            "--lr", "1e-4", "--lr-decay-style", "constant", "--clip-grad", "1.0", "--train-iters", str(steps),
            "--seed", str(SEED), "--log-interval", "1", "--no-save-optim", "--no-save-rng", "--no-progress-bar",
            *(["--bf16"] if bf16 else [])]


def packing_available(cmd: list[str], env: dict, log: Path) -> tuple[bool, str]:
    """Whether omnitune.train accepts packing: true (--dry-run: checks the configs, trains nothing)."""
    rc, _, tail = run_child([*cmd, "--dry-run"], env, log)
    if rc == 0:
        return True, ""
    low = tail.lower()
    if "pack" in low and "not implemented" in low:
        return False, "not available in this checkout"
    return False, f"dry run failed: {tail.splitlines()[-1] if tail else f'exit {rc}'}"


def omnitune_leg(cmd: list[str], save: Path, env: dict, warmup: int) -> dict:
    shutil.rmtree(save, ignore_errors=True)
    save.mkdir(parents=True)
    rc, rss, tail = run_child(cmd, env, save.parent / f"{save.name}.log")
    if rc != 0:
        return {"error": tail.splitlines()[-1] if tail else f"exit {rc}", "rss": rss}
    recs = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens" in r]
    res = timed(([r["tokens"] for r in recs]), [r["step_time"] for r in recs], warmup)
    res.update(rss=rss, consumed=[r.get("consumed_samples") for r in recs])
    shutil.rmtree(save, ignore_errors=True)   # the end-of-run checkpoint: not needed
    return res


def timed(tokens: list[float], times: list[float], warmup: int) -> dict:
    tok, t = sum(tokens[warmup:]), sum(times[warmup:])
    return {"tps": tok / t, "tokens": tokens, "times": times, "step_s": t / len(times[warmup:])}


def trainer_leg(spec: dict, out: Path, env: dict) -> dict:
    spec_file = out / "trainer_leg.json"
    result = out / "trainer_leg.result.json"
    result.unlink(missing_ok=True)
    spec_file.write_text(json.dumps({**spec, "result": str(result)}))
    rc, rss, tail = run_child([sys.executable, str(Path(__file__).resolve()), "--_trainer-leg", str(spec_file)],
                              env, out / "trainer_leg.log")
    if rc != 0:
        return {"error": tail.splitlines()[-1] if tail else f"exit {rc}", "rss": rss}
    res = json.loads(result.read_text())
    res["rss"] = rss
    return res


def trainer_child(spec_file: str) -> None:
    """The transformers Trainer run (in its own process): omnitune's samples and micro-batches."""
    import torch
    from torch.utils.data import SequentialSampler, Subset
    from transformers import Qwen2VLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    from omnitune.data import Collator

    sp = json.loads(Path(spec_file).read_text())
    ds, processor = load_dataset(Path(sp["data_json"]), Path(sp["hf_dir"]), sp["seq"])
    ordered = Subset(ds, sampler_order(len(ds), SEED))
    collate = Collator(processor.tokenizer.pad_token_id)
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")

    def hf_collate(items):
        return {k: v for k, v in collate(items).items() if k in keys}

    class Timer(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.tokens = None, [], []

        def on_step_begin(self, args, state, control, **kw):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            timer.tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration.from_pretrained(sp["hf_dir"], dtype=torch.float32)
    timer = Timer()
    acc = sp["gbs"] // sp["mbs"]
    args = TrainingArguments(output_dir=str(Path(sp["out"]) / "hf_trainer"), per_device_train_batch_size=sp["mbs"],
                             gradient_accumulation_steps=acc, max_steps=sp["steps"], learning_rate=1e-4,
                             lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10 ** 9,
                             save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, seed=SEED, bf16=sp["bf16"])
    OrderedTrainer(model=model, args=args, train_dataset=ordered, data_collator=hf_collate,
                   callbacks=[timer]).train()
    marks = [timer.start, *timer.ends]
    times = [b - a for a, b in zip(marks, marks[1:])]
    tokens = [sum(timer.tokens[i * acc:(i + 1) * acc]) for i in range(len(times))]
    Path(sp["result"]).write_text(json.dumps(timed(tokens, times, sp["warmup"])))


# ------------------------------------------------------------------------------------------ report
def fmt_rss(res: dict) -> str:
    return f"{res['rss']:.0f} MiB" if res.get("rss") else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best-of and median reported)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of a padded run (dataset = steps x gbs)")
    p.add_argument("--warmup", type=int, default=2, help="first steps of every run not timed")
    p.add_argument("--mbs", type=int, default=4, help="padded micro-batch size")
    p.add_argument("--gbs", type=int, default=8, help="padded global batch size (samples per step)")
    p.add_argument("--seq-length", type=int, default=1024, help="padded --seq-length (no sample is longer)")
    p.add_argument("--pack-length", type=int, default=2048, help="packed --seq-length: the capacity of a row")
    p.add_argument("--max-tokens", type=int, default=900, help="longest sample aimed at (tokens)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads of every run")
    p.add_argument("--out", default=str(REPO / "bench_out" / "packing"))
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round, 3 steps (1 not timed), batch 2/2, samples up to 400 tokens")
    p.add_argument("--_trainer-leg", dest="trainer_leg", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trainer_leg:
        return trainer_child(a.trainer_leg)
    if a.quick:
        a.rounds, a.steps, a.warmup, a.mbs, a.gbs, a.pack_length, a.max_tokens = 1, 3, 1, 2, 2, 512, 400
    if a.gbs % a.mbs or a.steps <= a.warmup:
        p.error("--gbs must be a multiple of --mbs and --steps larger than --warmup")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run_child then kills the running child
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    import torch
    torch.set_num_threads(a.threads)

    load_start = os.getloadavg()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags()
    dtypes = ["float32"] + (["bfloat16"] if flags & {"avx512_bf16", "amx_bf16", "amx_tile"} else [])
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; {a.threads} torch threads per run; dtypes "
          f"{', '.join(dtypes)}{'' if len(dtypes) > 1 else ' (no avx512_bf16/amx: bf16 skipped)'}", flush=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}", flush=True)

    hf_dir = build_medium_model(out / "qwen2vl_medium")
    pc = param_counts(hf_dir)
    n = a.steps * a.gbs
    padded_json, packed_json, model_json = write_configs(out, hf_dir, n, seed=0, max_tokens=a.max_tokens)
    ds, _ = load_dataset(padded_json, hf_dir, a.seq_length)
    stats = sample_stats(ds)
    lengths = [s["len"] for s in stats]
    if len(ds) != n or ds.num_truncated:
        print(f"warning: {len(ds)} of {n} samples usable, {ds.num_truncated} truncated at {a.seq_length}")
    n = len(ds)
    print(f"model: Qwen2-VL-shaped, {pc['total'] / 1e6:.1f}M parameters (text decoder + tied lm_head "
          f"{pc['text'] / 1e6:.1f}M, ViT {pc['vit'] / 1e6:.1f}M, merger {pc['merger'] / 1e6:.1f}M): hidden {pc['H']} x "
          f"{pc['L']} layers, {pc['heads']} heads / {pc['kv']} kv, MLP {pc['inter']}, vision depth {pc['Lv']} x "
          f"{pc['Hv']}, vocab {pc['vocab']}", flush=True)
    with_img = sum(1 for s in stats if s["patches"])
    multi = sum(1 for m in json.loads((out / "mixed_data" / "mixed.json").read_text()) if len(m["messages"]) > 2)
    srt = sorted(lengths)
    print(f"data: {n} samples ({with_img} with an image, {multi} multi-turn); tokens per sample min "
          f"{srt[0]} / median {srt[n // 2]} / max {srt[-1]}, mean {sum(srt) / n:.0f}; trained (answer) tokens "
          f"{sum(s['trained'] for s in stats) / sum(srt):.0%} of all", flush=True)

    # batches and padding, in omnitune's sampler order
    order = sampler_order(n, SEED)
    real, pad = padded_stats(lengths, order, a.mbs)
    rows = pack_best_fit_decreasing(lengths, a.pack_length)
    nf_rows = pack_next_fit(lengths, order, a.pack_length)
    per_row = n / len(rows)
    rows_per_step = max(1, round(a.gbs / per_row))
    pack_steps = max(a.warmup + 2, round(len(rows) / rows_per_step))
    total = sum(lengths)
    print(f"batches: padded micro {a.mbs} x global {a.gbs} samples, --seq-length {a.seq_length}, {a.steps} steps; "
          f"packed micro 1 row x global {rows_per_step} row(s) of --seq-length {a.pack_length} ({len(rows)} rows "
          f"best-fit decreasing: {per_row:.1f} samples per row, ~{rows_per_step * per_row:.1f} samples per step), "
          f"{pack_steps} steps; first {a.warmup} steps of each run not timed", flush=True)
    print(f"padding per real token: padded micro-batches {pad / real:.3f} ({pad} pad / {real} real over the epoch); "
          f"packed rows 0 at one row per micro-batch, "
          f"{(len(rows) * a.pack_length - total) / total:.3f} if every row were padded to capacity (fill "
          f"{total / (len(rows) * a.pack_length):.0%}; next-fit in sampler order: {len(nf_rows)} rows, fill "
          f"{total / (len(nf_rows) * a.pack_length):.0%})", flush=True)

    # FLOPs per real token: exact for the timed padded steps, dataset mean for packed
    timed_ids = order[a.warmup * a.gbs:a.steps * a.gbs]
    fpt_padded = sum(sample_flops(stats[i], pc) for i in timed_ids) / sum(lengths[i] for i in timed_ids)
    fpt_all = sum(sample_flops(s, pc) for s in stats) / sum(lengths)

    legs = []
    for dt in dtypes:
        bf16 = dt == "bfloat16"
        tag = "" if len(dtypes) == 1 else f" {dt}"
        legs.append((f"Trainer padded{tag}", dt, "trainer", {
            "data_json": str(padded_json), "hf_dir": str(hf_dir), "seq": a.seq_length, "mbs": a.mbs, "gbs": a.gbs,
            "steps": a.steps, "warmup": a.warmup, "bf16": bf16, "out": str(out)}))
        legs.append((f"omnitune padded{tag}", dt, "omnitune", omnitune_cmd(
            padded_json, model_json, hf_dir, out / f"save_padded_{dt}", a.steps, a.mbs, a.gbs, a.seq_length, bf16)))
        legs.append((f"omnitune packed{tag}", dt, "packed", omnitune_cmd(
            packed_json, model_json, hf_dir, out / f"save_packed_{dt}", pack_steps, 1, rows_per_step,
            a.pack_length, bf16)))
    ok, why = packing_available(legs[2][3], env, out / "packing_probe.log")
    if not ok:
        print(f"packed: {why}", flush=True)

    results = {name: [] for name, *_ in legs}
    peaks = {dt: [] for dt in dtypes}
    for r in range(a.rounds):
        for dt in dtypes:
            peaks[dt].append(matmul_peak(dt))
        line = []
        for name, dt, kind, spec in legs:
            if kind == "packed" and not ok:
                continue
            if kind == "trainer":
                res = trainer_leg(spec, out, env)
            else:
                res = omnitune_leg(spec, Path(spec[spec.index("--save") + 1]), env, a.warmup)
            results[name].append(res)
            line.append(f"{name} {res['tps']:.1f}" if "tps" in res else f"{name} FAILED ({res['error']})")
        la = os.getloadavg()[0]
        print(f"round {r + 1}/{a.rounds}: " + " | ".join(line) + " tokens/s | matmul peak "
              + ", ".join(f"{dt} {peaks[dt][-1] / 1e9:.1f}" for dt in dtypes) + f" GFLOP/s | load {la:.2f}",
              flush=True)

    # summary
    print(f"\nresults over {a.rounds} round(s) (tokens = real, unpadded tokens; model FLOP/s as % of the best "
          f"measured {'/'.join(dtypes)} matmul peak):")
    print(f"  {'run':<24} {'tok/s best':>10} {'median':>9} {'tok/step':>9} {'s/step':>7} {'GFLOP/s':>8} "
          f"{'% peak':>7} {'peak RSS':>9}")
    best = {}
    for name, dt, kind, _ in legs:
        rs = [x for x in results[name] if "tps" in x]
        if kind == "packed" and not ok:
            print(f"  {name:<24} packed: {why}")
            continue
        if not rs:
            err = results[name][0]["error"] if results[name] else "not run"
            print(f"  {name:<24} failed: {err}")
            continue
        tps = [x["tps"] for x in rs]
        b, med = max(tps), statistics.median(tps)
        best[name] = (b, med)
        top = rs[tps.index(b)]
        tok_step = sum(top["tokens"][a.warmup:]) / len(top["tokens"][a.warmup:])
        fpt = fpt_all if kind == "packed" else fpt_padded
        gflops = b * fpt / 1e9
        peak = max(peaks[dt])
        print(f"  {name:<24} {b:>10.1f} {med:>9.1f} {tok_step:>9.0f} {top['step_s']:>7.2f} {gflops:>8.2f} "
              f"{100 * b * fpt / peak:>6.1f}% {fmt_rss(top):>9}")
        if kind == "packed" and tok_step > rows_per_step * a.pack_length:
            print(f"  warning: {tok_step:.0f} tokens per packed step is more than {rows_per_step} row(s) of "
                  f"{a.pack_length} hold: metrics.jsonl tokens are not real tokens here")
    print(f"  model FLOPs per real token: {fpt_padded / 1e9:.3f} GFLOP (timed padded samples), {fpt_all / 1e9:.3f} "
          f"(all samples; packed); matmul peak "
          + ", ".join(f"{dt} best {max(v) / 1e9:.1f} / median {statistics.median(v) / 1e9:.1f} GFLOP/s"
                      for dt, v in peaks.items()))
    same = [(x, y) for x, y in zip(results[legs[0][0]], results[legs[1][0]]) if "tokens" in x and "tokens" in y]
    if same:
        print(f"  Trainer and omnitune padded trained the same micro-batches: "
              f"{'yes' if all(x['tokens'] == y['tokens'] for x, y in same) else 'NO (tokens per step differ)'}")
    for dt in dtypes:
        tag = "" if len(dtypes) == 1 else f" {dt}"
        hf, om, pk = (best.get(f"{k}{tag}") for k in ("Trainer padded", "omnitune padded", "omnitune packed"))
        parts = []
        if hf and om:
            parts.append(f"omnitune padded / Trainer padded {om[0] / hf[0]:.2f}x (median {om[1] / hf[1]:.2f}x)")
        if hf and pk:
            parts.append(f"omnitune packed / Trainer padded {pk[0] / hf[0]:.2f}x (median {pk[1] / hf[1]:.2f}x)")
        if om and pk:
            parts.append(f"packed / padded (omnitune) {pk[0] / om[0]:.2f}x")
        if not pk:
            parts.append("packed ratios: n/a (no packed run)")
        print(f"ratios{tag}: " + "; ".join(parts))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
