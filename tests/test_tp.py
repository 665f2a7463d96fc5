"""Tensor parallelism (parallel/tp.py, the families' tp plans, ops/vocab_parallel.py, parallel/grad.py).

Fast tests (one process): every family's plan resolves on its tiny model (no stale path) and covers
the Linear layers it should; the vocab-parallel cross-entropy / embedding on a 1-rank mesh equal the
plain ones; clip_grad_norm_ on plain tensors equals torch's.

Slow tests run this file under torchrun (2 processes = TP2, 4 processes = DP2 x TP2): the model is
built with the same seed in every process; a float64 copy is the reference, computed by hand from
plain HF hidden states + lm_head (no omnitune loss code). The TP model goes through TrainModel ->
apply_tp -> apply_fsdp -> AdamW and the real ``Trainer.train_step``; the first step's loss and full
gradients (DTensor.full_tensor()) and then the losses of a few AdamW steps (with gradient clipping
active, parallel.grad.clip_grad_norm_) are compared with the reference. Cases cover every family
(image in every batch, audio for the Omni thinkers), the chunk modes, sequence parallel, recompute,
a tied embedding still one Parameter after the steps, and (DP2 x TP2) a DCP checkpoint whose tensors
equal the parameters' full tensors. ``TP_DEBUG=1`` prints per-parameter errors instead of asserting.
"""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from omnitune.train.loss import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
ALL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe")


# ------------------------------------------------------------------------------------- helpers
def tiny_model(name: str, seed: int = 0, device=None):
    from omnitune.models.registry import get_family

    fam = get_family(name)
    torch.manual_seed(seed)
    if device is not None:
        with torch.device(device):
            model = fam.model_class()._from_config(fam.tiny_config(), dtype=torch.float32)
    else:
        model = fam.model_class()._from_config(fam.tiny_config(), dtype=torch.float32)
    model.config.use_cache = False
    for p in fam.unused_parameters(model):
        p.requires_grad_(False)
    return fam, model


def _ids(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    raise AttributeError(names)


def make_batch(fam, model, seed: int, image: bool = True, audio: bool = False, n: int = 2) -> dict:
    """Real-shaped synthetic micro-batch: per sample text, an image (4 LLM tokens), an audio clip
    (Omni), more text; sample 1 is shorter (right padding). Labels: the text after the media."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    vc = fam.vision_tower(model).config
    patch, merge, tps = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    img_tok = _ids(cfg, "image_token_id", "image_token_index")
    vs, ve = cfg.vision_start_token_id, cfg.vision_end_token_id
    omni = fam.audio_tower(model) is not None
    grid = [1, 2 * merge, 2 * merge]
    n_img = grid[1] * grid[2] // merge ** 2
    frames = 60
    if omni and audio:
        at = fam.audio_tower(model)
        if hasattr(at, "_get_feat_extract_output_lengths"):        # Qwen2.5-Omni
            n_aud = int(at._get_feat_extract_output_lengths(torch.tensor([frames]))[1][0])
        else:                                                      # Qwen3-Omni
            from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import \
                _get_feat_extract_output_lengths
            n_aud = int(_get_feat_extract_output_lengths(torch.tensor([frames]), at.config.n_window))
        a_tok = _ids(cfg, "audio_token_id", "audio_token_index")
        a_s, a_e = cfg.audio_start_token_id, cfg.audio_end_token_id
    rows, types, label_from = [], [], []
    for b in range(n):
        ids, tt = [], []

        def text(k):
            ids.extend(torch.randint(100, 5000, (k,), generator=g).tolist())
            tt.extend([0] * k)

        text(3)
        if image:
            ids += [vs] + [img_tok] * n_img + [ve]; tt += [0] + [1] * n_img + [0]
        if omni and audio:
            ids += [a_s] + [a_tok] * n_aud + [a_e]; tt += [0] + [3] * n_aud + [0]
        label_from.append(len(ids))
        text(9 - 3 * b)
        rows.append(ids); types.append(tt)
    S = max(len(r) for r in rows)
    pad = 151643
    input_ids = torch.full((n, S), pad)
    att = torch.zeros((n, S), dtype=torch.long)
    mm = torch.zeros((n, S), dtype=torch.int32)
    labels = torch.full((n, S), IGNORE_INDEX)
    for b, r in enumerate(rows):
        input_ids[b, :len(r)] = torch.tensor(r)
        att[b, :len(r)] = 1
        mm[b, :len(r)] = torch.tensor(types[b], dtype=torch.int32)
        labels[b, label_from[b]:len(r)] = input_ids[b, label_from[b]:len(r)]
    out = {"input_ids": input_ids, "attention_mask": att, "labels": labels}
    if not omni:
        out["mm_token_type_ids"] = mm
    if image:
        dim = getattr(vc, "in_channels", getattr(vc, "in_chans", 3)) * tps * patch * patch
        out["pixel_values"] = torch.randn(n * grid[0] * grid[1] * grid[2], dim, generator=g)
        out["image_grid_thw"] = torch.tensor([grid] * n)
    if omni and audio:
        out["input_features"] = torch.randn(n, fam.audio_tower(model).config.num_mel_bins, frames, generator=g)
        out["feature_attention_mask"] = torch.ones(n, frames, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------- fast tests
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_tp_plan_paths_exist_and_cover_linears(name):
    """Every pattern of the family's plan matches modules of its tiny model, every style name is
    known, and every Linear of the attention / MLP blocks is sharded (the rest is listed)."""
    from omnitune.parallel.tp import make_style, resolve_plan

    fam, model = tiny_model(name, device="meta")
    plan = fam.tp_plan(model)
    resolved = resolve_plan(model, plan)
    for _, styles in resolved:
        for s in styles:
            make_style(s, sequence_parallel=True)
            make_style(s, sequence_parallel=False)
    covered = {p for p, styles in resolved if any(s in ("colwise", "rowwise", "rowwise_seq", "colwise_qkv",
                                                          "lm_head") for s in styles)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # replicated on purpose: small projections outside the repeated blocks
    replicated = {"model.audio_tower.proj", "model.audio_tower.conv_out", "model.audio_tower.proj1",
                  "model.audio_tower.proj2"}
    assert linears - covered == linears & replicated, sorted(linears - covered)
    embed = model.get_input_embeddings()
    assert dict(resolved)[next(n for n, m in model.named_modules() if m is embed)] == ("embedding",)
    heads = [p for p, s in resolved if any(x.startswith("heads:") for x in s)]
    for p in heads:   # the head-count attributes named exist on the module
        for s in dict(resolved)[p]:
            if s.startswith("heads:"):
                for a in s[6:].split(","):
                    assert isinstance(getattr(model.get_submodule(p), a), int), (p, a)
    if name in ("qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe"):
        assert sum("q_norm" in p for p, _ in resolved) == model.config.get_text_config().num_hidden_layers
    if "moe" in name:   # experts and router are not TP-sharded
        assert not any(".experts" in p or p.endswith("mlp.gate") for p, _ in resolved)


def test_resolve_plan_rejects_stale_path():
    from omnitune.parallel.tp import resolve_plan

    _, model = tiny_model("qwen2_vl", device="meta")
    with pytest.raises(ValueError, match="matches no module"):
        resolve_plan(model, {"model.language_model.layers.*.self_attn.qkv_proj": "colwise"})


@pytest.fixture(scope="module")
def one_rank_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))


@pytest.mark.parametrize("chunk", [None, 3])
def test_vocab_parallel_ce_and_embedding_one_rank(one_rank_mesh, chunk):
    from torch.distributed.tensor import Shard, distribute_tensor

    from omnitune.ops.vocab_parallel import (is_vocab_sharded, vocab_parallel_embedding,
                                             vocab_parallel_linear_cross_entropy)

    torch.manual_seed(0)
    h = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (7,))
    gl = torch.rand(7, dtype=torch.float64)
    wd = distribute_tensor(w.detach(), one_rank_mesh, [Shard(0)]).requires_grad_()
    assert is_vocab_sharded(wd) and not is_vocab_sharded(w)
    hd = h.detach().clone().requires_grad_()
    got = vocab_parallel_linear_cross_entropy(hd, wd, None, t, chunk)
    want = F.cross_entropy(h @ w.t(), t, reduction="none")
    from tolerance import assert_close_scaled

    assert_close_scaled(got, want, rel=1e-6, scale=1e-6, msg="loss")   # logits are fp32, as in loss.py
    (got.double() * gl).sum().backward()
    (want * gl).sum().backward()
    assert_close_scaled(hd.grad, h.grad, rel=1e-5, scale=1e-5, msg="d hidden")
    assert_close_scaled(wd.grad.full_tensor(), w.grad, rel=1e-5, scale=1e-5, msg="d weight")
    ids = torch.tensor([[1, 3, 49, 0, 3]])
    e = vocab_parallel_embedding(ids, wd, padding_idx=3)
    torch.testing.assert_close(e, F.embedding(ids, w.detach(), padding_idx=3))
    # the style: same state dict, same output; a deep copy keeps its own weight
    from torch.distributed.tensor.parallel import parallelize_module

    from omnitune.parallel.tp import make_style

    emb = torch.nn.Embedding(50, 16, padding_idx=3)
    want = emb(ids)
    parallelize_module(emb, one_rank_mesh, make_style("embedding"))
    assert list(emb.state_dict()) == ["weight"] and isinstance(emb, torch.nn.Embedding)
    torch.testing.assert_close(emb(ids), want)
    twin = copy.deepcopy(emb)
    with torch.no_grad():
        twin.weight.zero_()
        assert float(twin(ids).abs().max()) == 0.0 and float(emb(ids).abs().max()) > 0


def test_clip_grad_norm_plain_matches_torch():
    from omnitune.parallel.grad import clip_grad_norm_

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    for x, y in zip(a, b):
        x.grad = torch.randn(5, 3)
        y.grad = x.grad.clone()
    n1 = clip_grad_norm_(a, 0.5)
    n2 = torch.nn.utils.clip_grad_norm_(b, 0.5)
    assert abs(n1 - float(n2)) < 1e-5 * float(n2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------------- torchrun runs
def _torchrun(nproc: int, cases: list[str], tmp: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO / 'src'}:{REPO / 'tests'}",
               TP_CASES=",".join(cases), TP_TMP=str(tmp))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), str(Path(__file__).resolve())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    checked = [line for line in r.stdout.splitlines() if line.startswith("CHECKED")]
    assert len(checked) == len(cases), r.stdout
    print("\n".join(checked))
    return r.stdout


# family:compute_mode[:sp (sequence parallel)][:rc (full recompute)][:ckpt (DCP save compared)]
TP2_CASES = ["qwen2_vl:default", "qwen3_vl_moe:default", "qwen2_5_omni:default:rc", "qwen2_5_vl:chunk:sp",
             "qwen3_vl:dynamic_chunk:sp", "qwen3_omni_moe:chunk:sp:rc"]
DP2_TP2_CASES = ["qwen2_vl:chunk:sp:ckpt"]


@pytest.mark.slow
def test_tp2_matches_one_process(tmp_path):
    _torchrun(2, TP2_CASES, tmp_path)


@pytest.mark.slow
def test_dp2_tp2_matches_one_process(tmp_path):
    _torchrun(4, DP2_TP2_CASES, tmp_path)


# ----------------------------------------------------------------------------------- torchrun worker
STEPS = 3
LR, CLIP = 2e-3, 0.5


def trainer_for(tm, optimizer, dims, d, loss_type="default"):
    """A Trainer with only what train_step needs (args, dist context, dims, model, optimizer, loss
    type). ``t.d`` is the torchrun world; ``t.dims`` the parallel layout. The trainer's _clip_grad
    is the cross-mesh parallel.grad.clip_grad_norm_."""
    from omnitune.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.args = SimpleNamespace(bf16=False, clip_grad=CLIP)
    t.d = SimpleNamespace(world_size=d.world_size, rank=d.rank, device=d.device, is_main=d.rank == 0,
                          mesh=dims.mesh, dims=dims)
    t.dims = dims
    t.model, t.optimizer, t.loss_type = tm, optimizer, loss_type
    return t


def reference_losses(fam, ref, mbs: list[dict]) -> torch.Tensor:
    """Default loss type by hand in float64: token mean per micro-batch, mean over micro-batches."""
    total = 0.0
    for mb in mbs:
        mb = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in mb.items()}
        hidden, aux = fam.forward_hidden(ref, mb)
        logits = ref.lm_head(hidden)[:, :-1]
        lab = mb["labels"][:, 1:]
        keep = lab != IGNORE_INDEX
        total = total + F.cross_entropy(logits[keep], lab[keep]) + aux
    return total / len(mbs)


class CaptureGrads:
    """Optimizer wrapper: records the full (clipped) gradients before the first step."""

    def __init__(self, opt, model):
        self.opt, self.model, self.grads = opt, model, None

    def step(self):
        if self.grads is None:
            self.grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                          for n, p in self.model.hf.named_parameters() if p.grad is not None}
        self.opt.step()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)


def _run_case(case: str, d, dims) -> None:
    import torch.distributed as dist

    from omnitune.config.model import ModelJson
    from omnitune.parallel.fsdp import apply_fsdp
    from omnitune.parallel.tp import apply_tp
    from omnitune.train.model import TrainModel
    from omnitune.train.optim import build_optimizer
    from tolerance import assert_close_scaled

    t0 = time.perf_counter()
    name, mode, *flags = case.split(":")
    sp = "sp" in flags
    fam, hf = tiny_model(name)
    omni = fam.audio_tower(hf) is not None
    ref = copy.deepcopy(hf).double()
    from omnitune.ops.moe import experts_modules, set_experts_implementation
    set_experts_implementation(experts_modules(ref), fused=False)   # eager experts (grouped_mm has no fp64)
    n_micro = 2 * dims.dp                      # 2 micro-batches per data-parallel rank
    mbs = [make_batch(fam, hf, seed=100 + i, audio=omni) for i in range(n_micro)]
    mine = mbs[2 * dims.dp_rank: 2 * dims.dp_rank + 2]
    modules = {}
    if "rc" in flags:   # full recompute of every encoder and the decoder (collectives re-run in backward)
        full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        modules = {"image_encoder": {"vision_encoder": full}, "text_decoder": full}
        if omni:
            modules["audio_encoder"] = {"audio_encoder": full}
    mcfg = ModelJson(model_id=fam.model_ids[0], loss_cfg={"compute_mode": mode, "chunk_size": 3}, **modules)
    tm = TrainModel(hf, fam, mcfg)
    if modules:
        assert tm.settings_report["text_decoder"]["recompute"] == 2, tm.settings_report
    apply_tp(tm, fam, dims.mesh["tp"], sequence_parallel=sp)
    apply_fsdp(tm, fam.fsdp_units(hf), dims.mesh["dp_cp"], False)
    opt = build_optimizer(tm, LR, 0.1, (0.9, 0.95), 1e-8, allow_empty=False)
    cap = CaptureGrads(opt, tm)
    t = trainer_for(tm, cap, dims, d)
    tied = getattr(hf.config.get_text_config(), "tie_word_embeddings", False) or hf.config.tie_word_embeddings
    emb = hf.get_input_embeddings()
    if tied:
        assert hf.lm_head.weight is emb.weight, "tied embedding untied by TP / FSDP2"
    stats = [t.train_step(mine)]
    for _ in range(STEPS - 1):
        stats.append(t.train_step(mine))

    if tied:   # still one Parameter after FSDP2 and AdamW steps
        assert hf.lm_head.weight is emb.weight
    if "ckpt" in flags:   # the TP x FSDP2 layout saves through the trainer's DCP checkpoint as HF tensors
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        from omnitune.checkpoint.dcp import save_checkpoint

        final = {n: p.full_tensor().detach() for n, p in tm.hf.named_parameters()}
        path = save_checkpoint(Path(os.environ["TP_TMP"]) / name, STEPS, tm.hf, opt, {})
        if d.rank == 0:
            dcp_to_torch_save(path, path / "full.pt")
            saved = torch.load(path / "full.pt", weights_only=False)["model"]
            for pname, v in final.items():
                assert torch.equal(saved[pname], v), f"{case}: checkpoint of {pname} differs"
            assert len(saved) >= len(final)
    if d.rank == 0:   # the reference only where it is checked (the other ranks leave the CPU to it)
        ref_opt = build_optimizer(ref, LR, 0.1, (0.9, 0.95), 1e-8, allow_empty=False)
        want, ref_grads, ref_norms = [], None, []
        for _ in range(STEPS):
            loss = reference_losses(fam, ref, mbs)   # every DP rank's micro-batches
            loss.backward()
            ref_norms.append(float(torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None],
                                                                  CLIP)))
            if ref_grads is None:   # clipped, as the optimizer sees them
                ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            want.append(loss.item())
        got = [s["loss"] for s in stats]
        assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0]), (case, got, want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert abs(a - b) <= 1e-4 * abs(b), (case, i, got, want)
        assert abs(stats[0]["grad_norm"] - ref_norms[0]) <= 1e-6 * ref_norms[0], (stats[0]["grad_norm"], ref_norms)
        assert ref_norms[0] > CLIP          # clipping was active
        worst, n = 0.0, 0
        gmax = max(float(g.abs().max()) for g in ref_grads.values())
        if os.environ.get("TP_DEBUG"):
            print(f"DEBUG norms {[s['grad_norm'] for s in stats]} ref {ref_norms} loss {[s['loss'] for s in stats]} "
                  f"ref {want}", flush=True)
        for pname, g in ref_grads.items():
            mine_g = cap.grads.get(pname)
            assert mine_g is not None, f"{case}: no gradient for {pname}"
            if os.environ.get("TP_DEBUG"):
                err = float((mine_g.double() - g).abs().max()) / max(float(g.abs().max()), 1e-30)
                print(f"DEBUG {pname} {tuple(g.shape)} scaled err {err:.2e} ratio "
                      f"{float(mine_g.double().norm() / g.norm().clamp(min=1e-30)) - 1:.3e}", flush=True)
                continue
            if float(g.abs().max()) < 1e-6 * gmax:   # zero in exact arithmetic (e.g. a key bias): fp32 noise
                assert float(mine_g.abs().max()) < 1e-6 * gmax, (case, pname)
                continue
            assert_close_scaled(mine_g, g, rel=1e-5, scale=1e-5, msg=f"{case} {pname}")
            scale = float(g.abs().max())
            if scale > 0:
                worst = max(worst, float((mine_g.double() - g).abs().max()) / scale)
            n += 1
        missing = set(cap.grads) - set(ref_grads)
        assert not missing or all(float(cap.grads[k].abs().max()) == 0 for k in missing), missing
        print(f"CHECKED {case} dp={dims.dp} tp={dims.tp} loss {got[0]:.6f} (ref {want[0]:.6f}) losses "
              f"{[f'{x:.6f}' for x in got]} max rel loss diff "
              f"{max(abs(a - b) / abs(b) for a, b in zip(got, want)):.2e} grads {n} max scaled grad diff "
              f"{worst:.2e} grad_norm {stats[0]['grad_norm']:.5f} (ref {ref_norms[0]:.5f}) "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    dist.barrier()


def _worker() -> None:
    from omnitune.parallel.dims import ParallelDims
    from omnitune.parallel.mesh import init_distributed, shutdown

    torch.set_num_threads(1)
    d = init_distributed()
    dims = ParallelDims(world=d.world_size, tp=2).build("cpu")
    for case in os.environ["TP_CASES"].split(","):
        _run_case(case, d, dims)
    shutdown()


if __name__ == "__main__":
    _worker()
