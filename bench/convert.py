"""mm-convert speed and memory on a real-sized checkpoint: hf_to_mm and hf_to_dcp vs `cp`.

Builds once (cached under bench_out/convert_cache/) a synthetic Qwen2-VL-2B-shaped HF folder:
random bf16 weights with the real 2B shapes (28 LLM layers, hidden 1536, 32 ViT blocks of 1280,
151936-row tied embedding; ~4.4 GB) in several safetensors shards + index + config.json. Then, in
one run, each in its own fresh process (peak RSS = that process' ru_maxrss):

- `cp -r` of the folder (the floor: read + write every byte once),
- hf_to_mm TP2 with the seed's PP layout (llm [[1,9,9,9]], vit [[32,0,0,0]]),
- hf_to_dcp (MindSpeed-MM's DCP layout, every weight under "model.").

Prints seconds, throughput relative to cp (goal >= 0.8) and peak RSS against the largest tensor
(goal <= 1.5 x largest + 0.5 GiB). Outputs are deleted after each step (watch `df -h`).

    .venv/bin/python bench/convert.py [--shards 4] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench_out" / "convert_cache"
GIB = 2 ** 30

# Qwen2-VL-2B-Instruct
TEXT = dict(hidden=1536, inter=8960, layers=28, heads=12, kv=2, vocab=151936)
VIT = dict(depth=32, dim=1280, heads=16, mlp=5120, patch=14, temporal=2, merge=2)


def shapes() -> dict[str, tuple]:
    """On-disk (legacy) names and shapes of Qwen2-VL-2B (tied: no lm_head)."""
    h, i, hd = TEXT["hidden"], TEXT["inter"], TEXT["hidden"] // TEXT["heads"]
    kv = TEXT["kv"] * hd
    d, m = VIT["dim"], VIT["mlp"]
    out: dict[str, tuple] = {"model.embed_tokens.weight": (TEXT["vocab"], h),
                             "visual.patch_embed.proj.weight": (d, 3, VIT["temporal"], VIT["patch"], VIT["patch"])}
    for b in range(VIT["depth"]):
        p = f"visual.blocks.{b}."
        out.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                    p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                    p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                    p + "mlp.fc1.weight": (m, d), p + "mlp.fc1.bias": (m,),
                    p + "mlp.fc2.weight": (d, m), p + "mlp.fc2.bias": (d,)})
    mh = d * VIT["merge"] ** 2
    out.update({"visual.merger.ln_q.weight": (d,), "visual.merger.ln_q.bias": (d,),
                "visual.merger.mlp.0.weight": (mh, mh), "visual.merger.mlp.0.bias": (mh,),
                "visual.merger.mlp.2.weight": (h, mh), "visual.merger.mlp.2.bias": (h,)})
    for n in range(TEXT["layers"]):
        p = f"model.layers.{n}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i)})
    out["model.norm.weight"] = (h,)
    return out


def build(folder: Path, n_shards: int) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sh = shapes()
    total = sum(2 * _numel(s) for s in sh.values())
    per = total / n_shards
    shards, cur, size = [], {}, 0
    for k, s in sh.items():
        cur[k] = s
        size += 2 * _numel(s)
        if size >= per and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, size = {}, 0
    shards.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for j, part in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in part.items()}
        save_file(sd, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        del sd
        print(f"built {name}", file=sys.stderr)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=TEXT["vocab"], hidden_size=TEXT["hidden"], intermediate_size=TEXT["inter"],
                         num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"],
                         num_key_value_heads=TEXT["kv"], tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=VIT["depth"], embed_dim=VIT["dim"], hidden_size=TEXT["hidden"], mlp_ratio=4,
                           num_heads=VIT["heads"], patch_size=VIT["patch"], spatial_merge_size=VIT["merge"],
                           temporal_patch_size=VIT["temporal"], in_channels=3),
        tie_word_embeddings=True)
    cfg.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def _numel(s) -> int:
    n = 1
    for x in s:
        n *= x
    return n


# ------------------------------------------------------------------------------------ child steps
def peak_rss() -> int:
    """Peak resident set size of this process (VmHWM: anonymous + file-backed pages; unlike
    ru_maxrss it is not inherited from the parent across fork/exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(step: str, hf: Path, out: Path) -> None:
    """Run one step in this (fresh) process and print {"seconds", "maxrss"} as JSON."""
    sys.path.insert(0, str(REPO / "src"))
    import torch  # noqa: F401  (imported before timing in every step: same baseline)

    from omnitune.convert.dcp import DCP_PREFIX, hf_to_dcp_stream
    from omnitune.convert.qwen2vl import HfToMmConfig, Qwen2VLConverter

    base_rss = peak_rss()
    c0 = _cpu()
    t0 = time.perf_counter()
    if step == "cp":
        subprocess.run(["cp", "-r", str(hf), str(out)], check=True)
    elif step == "hf_to_mm":
        Qwen2VLConverter.hf_to_mm(HfToMmConfig(mm_dir=out, hf_config={"hf_dir": hf}, parallel_config=dict(
            llm_pp_layers=[[1, 9, 9, 9]], vit_pp_layers=[[32, 0, 0, 0]], tp_size=2)))
    elif step == "hf_to_dcp":
        hf_to_dcp_stream(hf, out, lambda sd: {DCP_PREFIX + k: v for k, v in sd.items()}, False, "dcp_dir")
    elif step == "baseline":
        pass
    else:
        raise SystemExit(f"unknown step {step}")
    dt = time.perf_counter() - t0
    cpu = _cpu() - c0
    rss = peak_rss()
    print(json.dumps({"seconds": dt, "cpu": cpu, "maxrss": rss, "base_rss": base_rss}))


def _cpu() -> float:
    """user + system CPU seconds of this process and its waited-for children (cp)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_step(step: str, hf: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    r = subprocess.run([sys.executable, __file__, "--child", step, "--hf", str(hf), "--out", str(out)],
                       capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", THP_MEM_ALLOC_ENABLE="1"))  # as the mm-convert CLI sets
    if r.returncode != 0:
        raise SystemExit(f"{step} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["out_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="rounds (cp, hf_to_mm, hf_to_dcp interleaved); best time kept")
    ap.add_argument("--child")
    ap.add_argument("--hf")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        child(a.child, Path(a.hf), Path(a.out))
        return
    hf = build(CACHE / "qwen2vl_2b_synth", a.shards)
    size = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    sh = shapes()
    largest = max(2 * _numel(s) for s in sh.values())
    print(f"checkpoint: {hf} ({size / GIB:.2f} GiB in {len(list(hf.glob('*.safetensors')))} shards, "
          f"largest tensor {largest / GIB:.3f} GiB)")
    print(subprocess.run(["df", "-h", str(CACHE)], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    subprocess.run(["cat", *map(str, hf.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm cache
    work = CACHE / "out"
    res = {"baseline": run_step("baseline", hf, work)}
    for _ in range(a.repeat):  # interleaved rounds: load from the other engineers hits every step alike
        for s in ("cp", "hf_to_mm", "hf_to_dcp"):
            r = run_step(s, hf, work)
            if s not in res or r["seconds"] < res[s]["seconds"]:
                res[s] = {**r, "maxrss": max(r["maxrss"], res.get(s, r)["maxrss"])}
    base = res["baseline"]["maxrss"]
    budget = 1.5 * largest + 0.5 * GIB
    print(f"{'step':10s} {'seconds':>8s} {'GiB/s':>7s} {'vs cp':>6s} {'CPU s':>6s} {'CPU vs cp':>9s} {'peak RSS':>9s} "
          f"{'RSS-py':>7s} {'RSS/largest':>11s} {'out GiB':>8s}")
    for s in ("cp", "hf_to_mm", "hf_to_dcp"):
        r = res[s]
        ratio = res["cp"]["seconds"] / r["seconds"]
        print(f"{s:10s} {r['seconds']:8.2f} {size / GIB / r['seconds']:7.2f} {ratio:6.2f} {r['cpu']:6.1f} "
              f"{res['cp']['cpu'] / r['cpu']:9.2f} {r['maxrss'] / GIB:8.2f}G {(r['maxrss'] - base) / GIB:6.2f}G {r['maxrss'] / largest:11.2f} "
              f"{r['out_bytes'] / GIB:8.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall-time ratios are only meaningful "
          f"on an idle machine; 'CPU vs cp' compares CPU seconds)")
    print(f"python+torch baseline RSS {base / GIB:.2f} GiB; RSS goal <= 1.5 x largest + 0.5 GiB = {budget / GIB:.2f} GiB")
    for s in ("hf_to_mm", "hf_to_dcp"):
        r = res[s]
        ratio = res["cp"]["seconds"] / r["seconds"]
        print(f"{s}: throughput/cp {ratio:.2f} ({'ok' if ratio >= 0.8 else 'below'} goal 0.8); peak RSS "
              f"{r['maxrss'] / GIB:.2f} GiB ({'ok' if r['maxrss'] <= budget else 'over'} goal {budget / GIB:.2f})")


if __name__ == "__main__":
    main()
