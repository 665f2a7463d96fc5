"""``--init-model-with-meta-device`` (checkpoint/sharded_load.py): a model built on the meta device,
sharded (FSDP2, DTensor TP), then materialised with each rank reading only its own shards, equals
(bit for bit) the normal path ``load_hf_model`` -> ``apply_fsdp``, from HF / mm / DCP folders.

The multi-process tests run this file under torchrun (``_worker``); the 4-rank one also measures
each rank's peak RSS for the meta path and for the full-model load of the same checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omnitune.checkpoint.sharded_load import gather, local_index_from, materialize_and_load
from omnitune.config.errors import ConfigError
from omnitune.models.registry import FAMILIES, get_family

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- local boxes
def test_local_index_matches_dtensor_shapes_offsets_and_strided_example():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    # _StridedShard's documented FSDP2-over-TP example: 8 rows, mesh (dp 2, tp 2): TP first, then dp
    rows = {c: local_index_from((8, 8), (2, 2), c, (_StridedShard(0, split_factor=2), Shard(0)))[0].tolist()
            for c in ((0, 0), (0, 1), (1, 0), (1, 1))}
    assert rows == {(0, 0): [0, 1], (0, 1): [4, 5], (1, 0): [2, 3], (1, 1): [6, 7]}
    cases = [((10, 7), (4,), [(Shard(0),)]), ((10, 7), (3,), [(Shard(1),)]), ((5,), (4,), [(Shard(0),)]),
             ((12, 6), (2, 2), [(Shard(0), Shard(0)), (Shard(0), Shard(1)), (Replicate(), Shard(1)),
                                (_StridedShard(0, split_factor=2), Shard(0)), (Shard(1), Replicate())]),
             ((9, 6, 4), (2, 3), [(Shard(2), Shard(0)), (_StridedShard(1, split_factor=3), Shard(1))])]
    for shape, mesh, plist in cases:
        for pl in plist:
            seen = torch.zeros(shape, dtype=torch.int64)
            for c in torch.cartesian_prod(*[torch.arange(n) for n in mesh]).reshape(-1, len(mesh)).tolist():
                idx = local_index_from(shape, mesh, c, pl)
                lshape, off = _compute_local_shape_and_global_offset(shape, mesh, c, pl)
                assert tuple(len(i) if i is not None else n for i, n in zip(idx, shape)) == tuple(lshape), (pl, c)
                assert all(i is None or not len(i) or int(i[0]) == o for i, o in zip(idx, off)), (pl, c)
                seen[torch.meshgrid(*[i if i is not None else torch.arange(n) for i, n in zip(idx, shape)],
                                    indexing="ij")] += 1
            replicas = 1
            for p, n in zip(pl, mesh):
                replicas *= n if p.is_replicate() else 1
            assert bool((seen == replicas).all()), (shape, mesh, pl)   # every element held, once per replica


def test_gather_is_a_view_for_runs_and_exact_for_index_sets():
    src = torch.arange(60.).view(6, 10)
    g = gather(src, [torch.arange(2, 5), None])
    assert g.data_ptr() == src[2].data_ptr() and torch.equal(g, src[2:5])
    i0, i1 = torch.tensor([0, 1, 4, 5]), torch.tensor([3, 7])
    assert torch.equal(gather(src, [i0, i1]), src[i0][:, i1])


def test_copy_rows_from_a_mapped_file_block_by_block(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from omnitune.checkpoint import sharded_load as S
    from omnitune.convert.stream import SafetensorsIndex

    t = torch.randn(37, 5, 3, dtype=torch.bfloat16)
    save_file({"w": t}, tmp_path / "a.safetensors")
    path, dtype, shape, a, _ = SafetensorsIndex(tmp_path).entries["w"]
    monkeypatch.setattr(S, "BLOCK", 4 * 15 * 2)   # 4 rows per mapping
    with open(path, "rb") as f:
        src = S._Mapped(f, a, dtype, shape, t.stride())
        rows = torch.tensor([3, 4, 5, 6, 7, 8, 20, 21, 0, 30, 31, 32, 33, 34, 35, 36])
        rest = [torch.tensor([0, 2, 4]), torch.arange(1, 3)]
        out = torch.empty(len(rows), 3, 2, dtype=torch.float32)
        S.copy_rows(src, rows, rest, out)
        assert torch.equal(out, t[rows][:, rest[0]][:, :, rest[1]].float())
        big = torch.zeros(40, 3, 2)
        pos = torch.tensor([1, 2, 9, 10])   # not one run: written through index_copy_
        S._into(big, 0, pos, lambda dst: S.copy_rows(src, rows[:4], rest, dst))
        assert torch.equal(big[pos], t[rows[:4]][:, rest[0]][:, :, rest[1]].float()) and big.sum() == big[pos].sum()


# ----------------------------------------------------------------------------------- one process
def _meta_load(fam, hf_dir, kind, path):
    from transformers import AutoConfig

    from omnitune.train.model import build_meta_model

    model = build_meta_model(fam, AutoConfig.from_pretrained(hf_dir))
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    return model, materialize_and_load(model, fam, kind, path)


def _assert_same_model(got, ref):
    a, b = dict(got.named_parameters()), dict(ref.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert a[k].requires_grad == b[k].requires_grad, k
    a, b = dict(got.named_buffers()), dict(ref.named_buffers())
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_model_from_hf_folder_equals_from_pretrained(tiny_model_dir, family):
    """Unsharded: names, converters (per-expert MoE weights, Omni thinker. prefix), rotary and
    sinusoid buffers, ties."""
    from omnitune.train.model import load_hf_model

    fam, hf = get_family(family), tiny_model_dir(family)
    model, rep = _meta_load(fam, hf, "hf", hf)
    _assert_same_model(model, load_hf_model(fam, str(hf)))
    assert rep.buffers and all(n.rsplit(".", 1)[-1] in ("inv_freq", "original_inv_freq", "positional_embedding")
                               for n in rep.buffers), rep.buffers
    if getattr(fam.text_config(model.config), "tie_word_embeddings", False):
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    if family == "qwen3_omni_moe":   # experts stacked by transformers' converter from per-expert tensors
        assert any("experts.gate_up_proj" in w for w in rep.built_whole)


@pytest.mark.parametrize("family,conv", [
    ("qwen2_vl", dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], tp_size=2)),
    ("qwen2_5_vl", dict(llm_pp_layers=[[0, 1], [1, 0]], vit_pp_layers=[[2, 0], [0, 0]], tp_size=2)),
    ("qwen2_5_omni", dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], audio_pp_layers=[[2, 0]], tp_size=2,
                          vit_tp_size=1)),
    ("qwen3_vl_moe", ["Qwen3VLConverter", "hf_to_dcp", "--hf_dir", "{hf}", "--dcp_dir", "{out}"]),
    ("qwen3_omni_moe", ["ExpertMergeDcpConverter", "hf_to_dcp", "--hf_dir", "{hf}", "--save_dir", "{out}"]),
])
def test_meta_model_from_mm_folder_equals_from_pretrained(tiny_model_dir, tmp_path, family, conv):
    """Megatron folders (TP2 + PP / VPP / hetero TP: every row from the TP piece holding it, no
    tensor built whole) and MindSpeed-MM DCP releases (entries mapped, not read)."""
    from omnitune.train.model import load_hf_model

    fam, hf = get_family(family), tiny_model_dir(family)
    out = _convert(family, hf, tmp_path / "mm", conv)
    ref = load_hf_model(fam, str(hf))
    for kind in ("mm", "dcp") if isinstance(conv, list) else ("mm",):   # a DCP release: either kind finds it
        model, rep = _meta_load(fam, hf, kind, out)
        _assert_same_model(model, ref)
        assert rep.built_whole == []


def _convert(family, hf, out, conv):
    if isinstance(conv, list):
        from omnitune.cli.mm_convert import main as mm_convert
        assert mm_convert([a.format(hf=hf, out=out) for a in conv]) == 0
        return out
    if family == "qwen2_vl":
        from omnitune.convert.qwen2vl import HfToMmConfig, Qwen2VLConverter as C
    else:
        from omnitune.convert.megatron import HfToMmConfig
        from omnitune.convert.qwen2_5 import Qwen2_5_OmniConverter, Qwen2_5_VLConverter
        C = Qwen2_5_OmniConverter if family == "qwen2_5_omni" else Qwen2_5_VLConverter
    C.hf_to_mm(HfToMmConfig(mm_dir=out, hf_config={"hf_dir": hf}, parallel_config=conv))
    return out


def _copy_without(src: Path, dst: Path, drop) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        save_file({k: v for k, v in sd.items() if not drop(k)}, f, metadata={"format": "pt"})
    return dst


def test_missing_weight_is_named_and_absent_unused_weight_is_zero(tiny_model_dir, tmp_path):
    fam = get_family("qwen2_vl")
    hf = _copy_without(tiny_model_dir("qwen2_vl"), tmp_path / "q", lambda k: k == "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match=r"does not hold 1 weights.*layers\.1\.mlp\.up_proj\.weight"):
        _meta_load(fam, hf, "hf", hf)
    omni = get_family("qwen2_5_omni")
    hf = _copy_without(tiny_model_dir("qwen2_5_omni"), tmp_path / "o", lambda k: "audio_bos_eos_token" in k)
    model, rep = _meta_load(omni, hf, "hf", hf)
    assert rep.zeroed_unused == ["model.audio_tower.audio_bos_eos_token.weight"]
    assert not model.model.audio_tower.audio_bos_eos_token.weight.any()
    assert not model.model.audio_tower.audio_bos_eos_token.weight.requires_grad


# ----------------------------------------------------------------------------------- torchrun
def _torchrun(n: int, spec: dict, tmp: Path, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src") + os.pathsep + str(REPO / "tests"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = tmp / f"spec_{spec['mode']}.json"
    f.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
           str(Path(__file__).resolve()), str(f)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    return r


def _save_batch(batch: dict, path: Path) -> str:
    torch.save({k: v for k, v in batch.items() if torch.is_tensor(v)}, path)
    return str(path)


@pytest.mark.slow
def test_two_ranks_fsdp2_and_tp_meta_init_equals_normal_load(tiny_model_dir, family_batch, tmp_path):
    """2 ranks: FSDP2 shards (and a 2-D (dp_cp, tp) DTensor layout) from HF folders (Qwen2-VL; the
    full Qwen2.5-Omni folder; Qwen3-Omni per-expert weights), an mm folder, a MindSpeed DCP release
    and an omnitune training checkpoint: the same local shards, buffers, step-1 loss and gradients."""
    cases = []
    for fam, mods in (("qwen2_vl", ("image",)), ("qwen2_5_omni", ("image", "audio")), ("qwen3_omni_moe", ("audio",))):
        hf = tiny_model_dir(fam)
        batch = _save_batch(family_batch(fam, n=2, modalities=mods), tmp_path / f"{fam}.pt")
        cases.append(dict(family=fam, hf=str(hf), kind="hf", path=str(hf), batch=batch))
    q2 = tiny_model_dir("qwen2_vl")
    cases.append(dict(family="qwen2_vl", hf=str(q2), kind="hf", path=str(q2), batch=cases[0]["batch"], tp=True))
    mm = _convert("qwen2_vl", q2, tmp_path / "mm_q2", dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], tp_size=2))
    cases.append(dict(family="qwen2_vl", hf=str(q2), kind="mm", path=str(mm)))
    cases.append(dict(family="qwen2_vl", hf=str(q2), kind="mm", path=str(mm), tp=True))
    om = tiny_model_dir("qwen2_5_omni")
    mmo = _convert("qwen2_5_omni", om, tmp_path / "mm_om", dict(llm_pp_layers=[[2]], vit_pp_layers=[[2]],
                                                                  audio_pp_layers=[[2]], tp_size=2))
    cases.append(dict(family="qwen2_5_omni", hf=str(om), kind="mm", path=str(mmo)))
    q3 = tiny_model_dir("qwen3_vl_moe")
    rel = _convert("qwen3_vl_moe", q3, tmp_path / "dcp_q3",
                   ["Qwen3VLConverter", "hf_to_dcp", "--hf_dir", "{hf}", "--dcp_dir", "{out}"])
    cases.append(dict(family="qwen3_vl_moe", hf=str(q3), kind="mm", path=str(rel)))
    cases.append(dict(family="qwen2_vl", hf=str(q2), kind="resume", path=str(tmp_path / "save"),
                      batch=cases[0]["batch"]))
    odd = _odd_folder(tmp_path / "odd")   # uneven FSDP2 shards
    cases.append(dict(family="qwen2_vl", hf=str(odd), kind="hf", path=str(odd), label=" (uneven shards)"))
    t = time.time()
    r = _torchrun(2, {"mode": "fsdp", "cases": cases}, tmp_path)
    checked = [x for x in r.stdout.splitlines() if x.startswith("CHECKED")]
    print("\n".join(checked) + f"\n2-rank launch: {time.time() - t:.1f} s")
    assert len(checked) == len(cases) + 1, r.stdout   # + the resume through load_checkpoint


def _odd_folder(out: Path) -> Path:
    """Tiny Qwen2-VL with rows FSDP2 cannot split evenly over 2 ranks (vocab 1001, MLP 129)."""
    fam = get_family("qwen2_vl")
    cfg = fam.tiny_config()
    t = cfg.text_config
    t.vocab_size, t.intermediate_size = 1001, 129
    t.bos_token_id = t.eos_token_id = t.pad_token_id = 0
    torch.manual_seed(3)
    fam.model_class()(cfg).save_pretrained(out)
    return out


def _bench_folder(root: Path) -> Path:
    """A Qwen2-VL HF folder, 0.53 GB in fp32 (real 151936 vocab, tied), stored in bf16."""
    from omnitune.models.registry import get_family

    fam = get_family("qwen2_vl")
    cfg = fam.tiny_config()
    t, v = cfg.text_config, cfg.vision_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 640, 1792, 8
    t.num_attention_heads, t.num_key_value_heads = 10, 2
    t.layer_types = ["full_attention"] * 8
    t.rope_parameters["mrope_section"] = [8, 12, 12]
    v.hidden_size = 640
    torch.manual_seed(0)
    model = fam.model_class()(cfg)
    out = root / "bench_qwen2vl"
    model.to(torch.bfloat16).save_pretrained(out)   # as hub checkpoints are; trained in fp32
    return out


@pytest.mark.slow
def test_four_ranks_peak_rss_meta_init_vs_full_load(tiny_model_dir, tmp_path):
    """4 ranks, 0.53 GB model: peak RSS per rank of meta init vs ``load_hf_model`` + FSDP2 of the same
    folder (the same shards); then a 2-D (dp 2 x tp 2) layout from the tiny HF and mm folders."""
    bench = _bench_folder(tmp_path)
    q2 = tiny_model_dir("qwen2_vl")
    mm = _convert("qwen2_vl", q2, tmp_path / "mm_q2", dict(llm_pp_layers=[[2]], vit_pp_layers=[[2]], tp_size=2))
    tp_cases = [dict(family="qwen2_vl", hf=str(q2), kind="hf", path=str(q2), tp=True),
                dict(family="qwen2_vl", hf=str(q2), kind="mm", path=str(mm), tp=True)]
    t = time.time()
    r = _torchrun(4, {"mode": "rss", "hf": str(bench), "cases": tp_cases}, tmp_path)
    launch = time.time() - t
    rows = [json.loads(x[4:]) for x in r.stdout.splitlines() if x.startswith("RSS ")]
    assert len(rows) == 4, r.stdout
    assert len([x for x in r.stdout.splitlines() if x.startswith("CHECKED")]) == len(tp_cases), r.stdout
    fig = {x["rank"]: x for x in rows}
    model_mb = fig[0]["model_mb"]
    print(f"\npeak RSS per rank above its baseline (MiB), 4 ranks, model {model_mb:.0f} MiB fp32 (bf16 on disk), "
          f"shard {fig[0]['shard_mb']:.0f} MiB:")
    for rank in range(4):
        m, f = fig[rank]["meta"], fig[rank]["full"]
        print(f"  rank {rank}: meta init {m['delta_mb']:6.1f} ({m['secs']:.1f} s)   load_hf_model + FSDP2 "
              f"{f['delta_mb']:6.1f} ({f['secs']:.1f} s)")
    print(f"  launch (both paths + dp2 x tp2 checks): {launch:.1f} s")
    for rank in range(4):
        m, f = fig[rank]["meta"], fig[rank]["full"]
        assert fig[rank]["same_shards"], rank
        assert m["delta_mb"] < 0.6 * model_mb, (rank, m["delta_mb"], model_mb)
        assert m["delta_mb"] < 0.6 * f["delta_mb"], (rank, m["delta_mb"], f["delta_mb"])


# ----------------------------------------------------------------------------------- torchrun worker
def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _build(fam, hf_dir: str, meta: bool, dims, tp: bool):
    from transformers import AutoConfig

    from omnitune.config.model import ModelJson
    from omnitune.parallel.fsdp import apply_fsdp
    from omnitune.train.model import TrainModel, build_meta_model, load_hf_model

    hf = build_meta_model(fam, AutoConfig.from_pretrained(hf_dir)) if meta else load_hf_model(fam, hf_dir)
    tm = TrainModel(hf, fam, ModelJson(model_id=fam.model_ids[0]))
    if tp:
        _tp_plan(hf, dims.mesh["tp"])
    apply_fsdp(tm, fam.fsdp_units(hf), dims.mesh["dp_cp"], False)
    return tm


def _tp_plan(hf, tp_mesh) -> None:
    """A hand-made TP plan (Megatron style) for the text decoder: colwise q/k/v/gate/up, rowwise o/down."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    col, row = ColwiseParallel, RowwiseParallel
    for layer in hf.model.language_model.layers:
        parallelize_module(layer, tp_mesh, {"self_attn.q_proj": col(), "self_attn.k_proj": col(),
                                            "self_attn.v_proj": col(), "self_attn.o_proj": row(),
                                            "mlp.gate_proj": col(), "mlp.up_proj": col(), "mlp.down_proj": row()})


def _assert_same_shards(a, b, what: str) -> int:
    pa, pb = dict(a.hf.named_parameters()), dict(b.hf.named_parameters())
    assert pa.keys() == pb.keys(), what
    n2d = 0
    for k in pa:
        x, y = pa[k], pb[k]
        assert x.placements == y.placements and x.device_mesh == y.device_mesh, (what, k)
        assert torch.equal(x._local_tensor, y._local_tensor), (what, k)
        n2d += x.device_mesh.ndim == 2
    ba, bb = dict(a.hf.named_buffers()), dict(b.hf.named_buffers())
    assert ba.keys() == bb.keys(), what
    for k in ba:
        assert torch.equal(ba[k], bb[k]), (what, k)
    return n2d


def _step(tm, batch):
    loss_sum, n, aux = tm(batch)
    loss = loss_sum / n + aux
    loss.backward()
    grads = {k: p.grad._local_tensor.clone() for k, p in tm.hf.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _check_cases(d, dims, cases) -> None:
    import torch.distributed as dist

    from omnitune.checkpoint import dcp as ckpt_io
    from omnitune.train.optim import build_optimizer

    for c in cases:
        fam = get_family(c["family"])
        tp = c.get("tp", False)
        what = f"{c['family']} {c['kind']}{' tp' if tp else ''}{c.get('label', '')}"
        torch.manual_seed(0)
        ref = _build(fam, c["hf"], False, dims, tp)
        batch = torch.load(c["batch"], weights_only=True) if c.get("batch") else None
        if c["kind"] == "resume":   # a trained step saved by save_checkpoint is what meta init must give back
            loss, _ = _step(ref, batch)
            opt = build_optimizer(ref, 1e-3, 0.0, (0.9, 0.999), 1e-8, False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ckpt_io.save_checkpoint(c["path"], 1, ref.hf, opt, {"consumed_samples": 2})
        meta = _build(fam, c["hf"], True, dims, tp)
        t = time.time()
        rep = materialize_and_load(meta, fam, c["kind"], c["path"])
        secs = time.time() - t
        n2d = _assert_same_shards(meta, ref, what)
        assert n2d > 0 if tp else n2d == 0, (what, n2d)
        extra = ""
        if batch is not None:
            la, ga = _step(ref, batch)
            lb, gb = _step(meta, batch)
            assert torch.equal(la, lb), (what, la.item(), lb.item())
            assert ga.keys() == gb.keys() and ga, what
            for k in ga:
                assert torch.equal(ga[k], gb[k]), (what, k)
            extra = f" loss={la.item():.6f} grads={len(ga)}"
        if rep.built_whole:
            extra += f" built whole: {rep.built_whole[:2]}"
        if d.rank == 0:
            print(f"CHECKED {what}: {rep.loaded} tensors, {len(rep.buffers)} buffers, whole={len(rep.built_whole)}, "
                  f"{secs:.2f} s{extra}", flush=True)
        if c["kind"] == "resume":   # the trainer's resume: materialise only, then load_checkpoint (model + optim)
            meta2 = _build(fam, c["hf"], True, dims, tp)
            materialize_and_load(meta2, fam, None)
            opt2 = build_optimizer(meta2, 1e-3, 0.0, (0.9, 0.999), 1e-8, False)
            state = ckpt_io.load_checkpoint(ckpt_io.resolve_checkpoint(c["path"]), meta2.hf, opt2)
            assert state["iteration"] == 1
            _assert_same_shards(meta2, ref, what + " load_checkpoint")
            if d.rank == 0:
                print(f"CHECKED {what} + load_checkpoint", flush=True)
        dist.barrier()


def _rss(d, dims, spec) -> None:
    """Meta init first (peak above the post-import baseline), then the normal load of the same
    folder on top of it (its own baseline includes the meta model, so only its increase counts);
    then the two are compared shard by shard."""
    import gc

    fam = get_family("qwen2_vl")
    _build(fam, spec["hf"], True, dims, False)   # imports every module both paths use, before the baseline
    gc.collect()
    out = {"rank": d.rank}
    models = {}
    for phase in ("meta", "full"):
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM := current RSS
        base = _rss_mb("VmRSS")
        t = time.time()
        tm = _build(fam, spec["hf"], phase == "meta", dims, False)
        if phase == "meta":
            materialize_and_load(tm, fam, "hf", spec["hf"])
        secs = time.time() - t
        out[phase] = dict(base_mb=base, peak_mb=_rss_mb("VmHWM"), delta_mb=_rss_mb("VmHWM") - base, secs=secs)
        models[phase] = tm
        gc.collect()
    a, b = (dict(models[k].hf.named_parameters()) for k in ("meta", "full"))
    out["same_shards"] = a.keys() == b.keys() and all(torch.equal(a[k]._local_tensor, b[k]._local_tensor) for k in a)
    out["model_mb"] = sum(p.numel() * p.element_size() for p in a.values()) / 2 ** 20
    out["shard_mb"] = sum(p._local_tensor.numel() * p.element_size() for p in a.values()) / 2 ** 20
    print("RSS " + json.dumps(out), flush=True)
    del a, b, models
    gc.collect()


def _worker(spec_path: str) -> None:
    from omnitune.parallel.dims import ParallelDims
    from omnitune.parallel.mesh import init_distributed, shutdown

    spec = json.loads(Path(spec_path).read_text())
    d = init_distributed()
    plain = ParallelDims(d.world_size).build("cpu")
    if spec["mode"] == "rss":
        _rss(d, plain, spec)
    if spec["cases"]:
        tp = ParallelDims(d.world_size, tp=2).build("cpu")
        _check_cases(d, plain, [c for c in spec["cases"] if not c.get("tp")])
        _check_cases(d, tp, [c for c in spec["cases"] if c.get("tp")])
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])
