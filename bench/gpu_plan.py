"""The GPU plan on paper (docs/gpu_plan.md comes from this): for Qwen2.5-VL-7B and Qwen3-VL-30B-A3B
on 8 GPUs, FLOPs per step, memory per rank and the step time / tokens per second the design should
reach at a target MFU, so the first GPU run has numbers to compare with. Nothing is measured here:
parameter counts come from meta-device models of the published configs (bench/layouts.py), state
per rank from the same estimate `--dry-run` prints, FLOPs and activations from the formulas below.

    .venv/bin/python bench/gpu_plan.py [--rows 64] [--seq 4096] [--image-share 0.25]

Workload: a global batch of ``rows`` packed rows of ``seq`` tokens (data.json packing: true), of
which ``image-share`` are image tokens (448x448 images: 1024 patches, 256 tokens after the 2x2
merge). FLOPs (training = forward + backward = 3 x forward, no recompute counted):
- text decoder: 6 x (active matmul parameters per token, lm_head included, embedding excluded)
  per token + causal attention 6 x L x (heads x head_dim) x S_ctx per token (S_ctx = the packed
  sample's length; the bound S_ctx = seq is used, i.e. one sample per row);
- vision tower: 6 x (its matmul parameters) per patch + attention 6 x depth x hidden x window per
  patch (window = the patches of one image, 1024, an upper bound for windowed blocks).
Activations per token per decoder layer (bf16, flash attention, no dropout): 10h + 4 kv_dim + 6 I
bytes for a dense SwiGLU layer (I = intermediate size), 8h + 4 kv_dim + k (2h + 6 I_moe) for a MoE
layer (top-k copies of the token); full recompute keeps the layer inputs (2h) plus one layer's set.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layouts import MODELS  # noqa: E402  (the published configs)

GPUS = {"H100 SXM (bf16 dense 989 TFLOP/s)": 989e12, "A100 (bf16 312 TFLOP/s)": 312e12}
PLANS = {   # model -> (flags, target MFU, why)
    "Qwen2.5-VL-7B": ([], 0.40, "FSDP2 over 8, no TP: large dense GEMMs (3584 x 18944), one all-gather "
                                "and one reduce-scatter per layer that overlap with its compute"),
    "Qwen3-VL-30B-A3B": (["--expert-model-parallel-size", "8"], 0.25,
                         "EP8 x FSDP8: the experts are small GEMMs (768 columns, ~tokens x 8 / 128 rows each) "
                         "and every MoE layer waits on two all-to-alls"),
}


def counts(family: str, hf_config):
    """(text matmul params active per token, text params total, vision matmul params, config)."""
    from omnitune.parallel.estimate import meta_model
    from omnitune.models.registry import get_family

    fam = get_family(family)
    model = meta_model(fam, hf_config)
    t = fam.text_config(hf_config)
    lm = fam.language_model(model)
    emb = lm.embed_tokens.weight.numel()
    text_total = sum(p.numel() for p in lm.parameters()) + fam.lm_head(model).weight.numel()
    active = text_total - emb
    k, e = getattr(t, "num_experts_per_tok", 0), getattr(t, "num_experts", 0)
    if e:
        expert = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n or n.endswith("experts"))
        active -= expert * (1 - k / e)
    vision = sum(p.numel() for p in fam.vision_tower(model).parameters() if p.ndim >= 2)
    return active, text_total, vision, t


def act_bytes_per_token_layer(t) -> float:
    h = t.hidden_size
    kv = t.num_key_value_heads * (getattr(t, "head_dim", None) or h // t.num_attention_heads)
    if getattr(t, "num_experts", 0):
        return 8 * h + 4 * kv + t.num_experts_per_tok * (2 * h + 6 * t.moe_intermediate_size)
    return 10 * h + 4 * kv + 6 * t.intermediate_size


def main() -> None:
    import transformers

    from omnitune.cli.demo import demo_configs
    from omnitune.models.registry import get_family
    from omnitune.parallel.estimate import estimate_rank_bytes
    from omnitune.train.trainer import make_plan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--image-share", type=float, default=0.25)
    p.add_argument("--gpus", type=int, default=8)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="omnitune_gpu_plan_"))
    tokens = a.rows * a.seq
    patches = tokens * a.image_share * 4
    print(f"workload: {a.rows} packed rows x {a.seq} tokens = {tokens} tokens per step, {a.image_share:.0%} image "
          f"tokens ({patches:.0f} vision patches, 448x448 images); {a.gpus} GPUs, bf16 compute, fp32 master "
          f"weights + AdamW")
    for name, (flags, mfu, why) in PLANS.items():
        family, cls, kw = MODELS[name]
        folder = root / name
        folder.mkdir()
        getattr(transformers, cls)(**kw).save_pretrained(folder)
        hf_config = transformers.AutoConfig.from_pretrained(folder)
        active, text_total, vision, t = counts(family, hf_config)
        heads_dim = t.num_attention_heads * (getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
        vc = get_family(family).trainable_config(hf_config).vision_config
        f_text = tokens * (6 * active + 6 * t.num_hidden_layers * heads_dim * a.seq)
        f_vis = patches * (6 * vision + 6 * vc.depth * vc.hidden_size * 1024)
        flops = f_text + f_vis
        data_json, model_json = demo_configs(folder, folder)
        m = json.loads(model_json.read_text())
        m["model_id"] = get_family(family).model_ids[0]
        model_json.write_text(json.dumps(m))
        d = json.loads(data_json.read_text())
        d["dataset_param"]["basic_parameters"]["template"] = get_family(family).template
        data_json.write_text(json.dumps(d))
        plan, _ = make_plan(["--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "1",
                             "--bf16", *flags], world_size=a.gpus)
        est = estimate_rank_bytes(plan.family, plan.hf_config, plan.dims, set(), bf16=True)
        per_layer = act_bytes_per_token_layer(t) * a.seq
        act_full = per_layer * t.num_hidden_layers
        act_rc = 2 * t.hidden_size * a.seq * t.num_hidden_layers + per_layer
        logits_chunk = 1024 * t.vocab_size * 4 * 2   # chunked loss: fp32 logits + grad of one chunk
        gib = 2 ** 30
        print(f"\n## {name} ({' '.join(flags) or 'FSDP2 only'} on {a.gpus} GPUs, DP {plan.dims.dp})")
        print(f"parameters: text {text_total / 1e9:.2f} B ({active / 1e9:.2f} B matmul-active per token), "
              f"vision matmuls {vision / 1e9:.2f} B")
        print(f"FLOPs per step: {flops / 1e15:.1f} PFLOP (text {f_text / 1e15:.1f}, vision {f_vis / 1e15:.2f}); "
              f"{flops / tokens / 1e9:.1f} GFLOP per token")
        print(f"memory per rank: weights + grads + AdamW {est.bytes_total / gib:.1f} GiB, largest unit gathered "
              f"{est.bytes_transient / gib:.2f} GiB; activations per row of {a.seq} tokens {act_full / gib:.1f} GiB "
              f"(full recompute: {act_rc / gib:.2f} GiB); chunked-loss logits {logits_chunk / gib:.2f} GiB")
        rows_per_rank = a.rows // a.gpus
        for recompute, act in (("no recompute", act_full), ("full recompute", act_rc)):
            total = est.bytes_total + est.bytes_transient * 2 + act + logits_chunk
            print(f"  micro-batch 1 row, {recompute}: ~{total / gib:.0f} GiB per rank "
                  f"(grad-acc {rows_per_rank} micro-batches per step)")
        print(f"target MFU {mfu:.0%}: {why}")
        for gpu, peak in GPUS.items():
            step = flops / (a.gpus * peak * mfu)
            print(f"  {gpu}: {step:.1f} s per step, {tokens / step / a.gpus:,.0f} tokens/s per GPU")


if __name__ == "__main__":
    main()
