"""Expert parallelism (parallel/ep.py + ops/moe_ep.py) against one process running every micro-batch.

The torchrun worker (this file) runs world 2 = DP 2 x EP 2 (each rank owns 2 of the 4 experts of
every layer and its own micro-batches), and world 4 = DP 4, EP 2 (experts also FSDP-sharded over 2
ranks): the trainer's ``train_step`` with FSDP2 (experts on ep_mesh["dp_cp_mod_ep"], the rest on
mesh["dp_cp"]), clipping and AdamW. Rank 0 checks the step-1 loss and every full gradient against a
float64 one-process reference (HF eager experts, all micro-batches), then the losses and grad norms
of the following steps. Cases: Qwen3-VL-MoE fused / eager experts, text-only and with an image
(vision tower run), full recompute, Qwen3-Omni-MoE thinker; router aux loss on. Plus block-level
routings that leave a rank without rows or tokens. The last case of a suite is saved with DCP; the
test process loads it into a one-process model and compares exactly.
"""
from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COEF = 0.05
STEPS = 3
LR = 1e-3
CLIP = 1.0
IMAGE_GRID = (1, 4, 4)    # 16 patches -> 4 LLM tokens (merge 2)


# ----------------------------------------------------------------------------------- data
def micro_batches(fam, n: int, seed: int, image_in: tuple[int, ...] = ()) -> list[dict]:
    """``n`` micro-batches of 2 samples (uneven lengths, padding, prompt masked); micro-batches whose
    index is in ``image_in`` carry one image in sample 0."""
    cfg = fam.tiny_config()
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(n):
        lens = [int(x) for x in torch.randint(6, 13, (2,), generator=g)]
        rows, types = [], []
        for b, L in enumerate(lens):
            ids = torch.randint(100, 5000, (L,), generator=g).tolist()
            tt = [0] * L
            if m in image_in and b == 0:
                n_img = math.prod(IMAGE_GRID) // 4
                ids[1:1] = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
                tt[1:1] = [0] + [1] * n_img + [0]
            rows.append(ids)
            types.append(tt)
        S = max(map(len, rows)) + 1
        pad = fam.text_config(cfg).pad_token_id
        ids = torch.full((2, S), pad)
        att = torch.zeros((2, S), dtype=torch.long)
        labels = torch.full((2, S), -100)
        tt = torch.zeros((2, S), dtype=torch.int32)
        for b, (r, t) in enumerate(zip(rows, types)):
            ids[b, :len(r)] = torch.tensor(r)
            att[b, :len(r)] = 1
            tt[b, :len(t)] = torch.tensor(t, dtype=torch.int32)
            keep = torch.tensor(t) == 0
            keep[:3] = False                          # prompt
            labels[b, :len(r)][keep] = ids[b, :len(r)][keep]
        mb = {"input_ids": ids, "attention_mask": att, "labels": labels}
        if m in image_in:
            vc = cfg.vision_config
            dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
            mb["pixel_values"] = torch.randn(math.prod(IMAGE_GRID), dim, generator=g)
            mb["image_grid_thw"] = torch.tensor([IMAGE_GRID])
            mb["mm_token_type_ids"] = tt
        out.append(mb)
    return out


def tiny_model(fam, coef: float):
    cfg = fam.tiny_config()
    fam.text_config(cfg).router_aux_loss_coef = coef
    torch.manual_seed(0)
    hf = fam.model_class()(cfg).float()
    hf.config.use_cache = False
    with torch.no_grad():  # routers start at zero: make routing non-trivial (and far from ties)
        for m in hf.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0, 0.5)
    for p in fam.unused_parameters(hf):
        p.requires_grad_(False)
    return hf


FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def model_cfg(fam, fused: bool, recompute: bool = False):
    from omnitune.config.model import ModelJson
    return ModelJson(model_id=fam.model_ids[0],
                     text_decoder={"use_npu_fused_moe": fused, **(FULL_RECOMPUTE if recompute else {})},
                     loss_cfg={"router_aux_loss_coef": COEF})


def optimizer(model):
    from omnitune.train.optim import build_optimizer
    return build_optimizer(model, LR, 0.01, (0.9, 0.95), 1e-8, allow_empty=False)


# ----------------------------------------------------------------------------------- reference
def reference_steps(fam, hf, mbs: list[dict], steps: int):
    """One process, float64, HF eager experts: the global-batch loss of train_step ("default": token
    mean per micro-batch, mean over micro-batches; + mean router aux), AdamW + clipping.
    Returns (losses, grad norms, step-1 gradients by name, after clipping)."""
    from omnitune.train.loss import local_counts, token_weights
    from omnitune.train.model import TrainModel

    tm = TrainModel(hf, fam, model_cfg(fam, fused=False))
    opt = optimizer(tm)
    counts = local_counts([mb["labels"] for mb in mbs])
    losses, norms, grads = [], [], None
    for step in range(steps):
        total = 0.0
        for mb in mbs:
            mb = dict(mb, loss_weights=token_weights(mb["labels"], "default", micro_batches=len(mbs),
                                                     global_tokens=float(counts[0]), global_samples=float(counts[1])))
            lp, _, aux = tm(mb)
            loss = lp + aux / len(mbs)
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for p in tm.parameters() if p.grad is not None], CLIP)))
        if step == 0:
            grads = {n: p.grad.clone() for n, p in tm.hf.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms, grads


# ----------------------------------------------------------------------------------- trainer
def ep_trainer(dims, model, opt, clip: float):
    """What ``Trainer.train_step`` needs, for a model sharded with EP + FSDP2."""
    from omnitune.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.args = SimpleNamespace(bf16=False, clip_grad=clip)
    t.d = SimpleNamespace(device=torch.device("cpu"), world_size=dims.world, rank=dims.rank)
    t.dims = dims
    t.model, t.optimizer, t.loss_type = model, opt, "default"
    return t   # train_step clips through parallel.grad.clip_grad_norm_ (both meshes)


def build_ep(fam, hf, fused: bool, dims, recompute: bool = False):
    from omnitune.parallel.ep import apply_ep
    from omnitune.parallel.fsdp import apply_fsdp
    from omnitune.train.model import TrainModel

    tm = TrainModel(hf, fam, model_cfg(fam, fused, recompute))
    if recompute:
        assert tm.settings_report["text_decoder"]["recompute"] == 2
    sharded = apply_ep(tm, fam, dims)
    assert len(sharded) == fam.tiny_config().text_config.num_hidden_layers
    apply_fsdp(tm, fam.fsdp_units(hf), dims.mesh["dp_cp"], False, dims=dims)
    return tm


# ----------------------------------------------------------------------------------- tests
def test_apply_ep_without_ep_is_a_no_op():
    from omnitune.models.registry import get_family
    from omnitune.parallel.dims import ParallelDims
    from omnitune.parallel.ep import apply_ep, ep_experts_modules

    fam = get_family("qwen3_vl_moe")
    with torch.device("meta"):
        hf = fam.model_class()(fam.tiny_config())
    assert apply_ep(hf, fam, ParallelDims(world=2, ep=1)) == [] and ep_experts_modules(hf) == []
    with pytest.raises(ValueError, match="4 experts per layer are not divisible by it"):
        apply_ep(hf, fam, ParallelDims(world=3, ep=3))   # refused before any mesh is used
    assert ep_experts_modules(hf) == []


def _torchrun(nproc: int, suite: str, out: Path, timeout: int = 900) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(Path(__file__).resolve()), suite, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    return r.stdout


SUITES = {  # name -> (processes, [(family, fused experts, micro-batches with an image, recompute)])
    # world 2 = DP 2, EP 2: experts FSDP group (dp_cp_mod_ep) of 1 rank
    "ep2": (2, [("qwen3_vl_moe", True, (), False),
                ("qwen3_vl_moe", True, (0,), False),
                ("qwen3_vl_moe", False, (0,), True),
                ("qwen3_omni_moe", True, (), False)]),
    # world 4 = DP 4, EP 2: experts FSDP-sharded over 2 ranks (sum + divide by 4)
    "dp4_ep2": (4, [("qwen3_vl_moe", False, (0,), False)]),
}


def _run_suite(suite: str, tmp_path: Path) -> None:
    nproc, cases = SUITES[suite]
    out = _torchrun(nproc, suite, tmp_path)
    checked = [line for line in out.splitlines() if line.startswith("CHECKED ")]
    assert len(checked) == len(cases), out
    assert suite != "ep2" or "BLOCK_CHECKED 4" in out, out
    print("\n".join(checked))
    _check_dcp_in_one_process(tmp_path, cases[-1][0])


@pytest.mark.slow
def test_ep2_two_ranks_equal_one_process_and_dcp_is_layout_free(tmp_path):
    _run_suite("ep2", tmp_path)


@pytest.mark.slow
def test_dp4_ep2_four_ranks_equal_one_process(tmp_path):
    _run_suite("dp4_ep2", tmp_path)


def _check_dcp_in_one_process(out: Path, family: str) -> None:
    """The EP2 checkpoint loads into a plain one-process model; every weight equals the EP model's
    full tensor exactly, and the DCP metadata holds full [E, ...] expert tensors (model + AdamW)."""
    from torch.distributed.checkpoint import FileSystemReader

    from omnitune.checkpoint.dcp import load_model_weights_from_dcp, resolve_checkpoint
    from omnitune.models.registry import get_family

    fam = get_family(family)
    ckpt = resolve_checkpoint(out / "save")
    full = torch.load(out / "full.pt", weights_only=True)
    fresh = fam.model_class()(fam.tiny_config()).float()
    load_model_weights_from_dcp(ckpt, fresh)
    params = dict(fresh.named_parameters())
    assert set(full) <= set(params) and len(full) > 10
    for name, want in full.items():
        assert torch.equal(params[name].detach(), want), name
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    E = fam.text_config(fam.tiny_config()).num_experts
    experts = [k for k in meta if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")]
    assert experts and all(tuple(meta[k].size)[0] == E for k in experts), {k: meta[k].size for k in experts}
    assert any("exp_avg" in k and "experts.down_proj" in k and tuple(meta[k].size)[0] == E for k in meta)


# ----------------------------------------------------------------------------------- torchrun worker
def _check_resume_at_ep(fam, fused: bool, dims, save: Path, full: dict, opt) -> None:
    """Resume the EP checkpoint into a fresh EP + FSDP2 model (other random weights): every weight
    and every AdamW moment equals the saved run's (full tensors, exact)."""
    from omnitune.checkpoint.dcp import load_checkpoint, resolve_checkpoint

    torch.manual_seed(123)
    hf = fam.model_class()(fam.tiny_config()).float()
    hf.config.use_cache = False
    for p in fam.unused_parameters(hf):
        p.requires_grad_(False)
    tm = build_ep(fam, hf, fused, dims)
    opt2 = optimizer(tm)
    load_checkpoint(resolve_checkpoint(save), tm.hf, opt2)
    for n, p in tm.hf.named_parameters():
        assert torch.equal(p.full_tensor(), full[n]), n
    saved = {id(p): opt.state[p] for g in opt.param_groups for p in g["params"]}
    pairs = zip([p for g in opt.param_groups for p in g["params"]], [p for g in opt2.param_groups for p in g["params"]])
    for a, b in pairs:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt2.state[b][key].full_tensor(), saved[id(a)][key].full_tensor()), key
        assert float(opt2.state[b]["step"]) == float(saved[id(a)]["step"]) == STEPS


def _check_block_edge_cases(dims) -> int:
    """One EP-sharded MoE block (no FSDP) against HF eager on the full weights, for routings that
    leave a rank without work: every token routed to rank 0's experts (rank 1 computes no rows),
    and rank 1 without any token. Output, input gradient and full expert gradients (summed over the
    ranks' tokens) must match; the backward all-to-alls must line up (no hang)."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    from omnitune.models.registry import get_family
    from omnitune.ops import moe
    from omnitune.parallel.ep import apply_ep
    from tolerance import assert_close_scaled

    tcfg = get_family("qwen3_vl_moe").tiny_config().text_config
    H, n = tcfg.hidden_size, 0
    for fused in (True, False):
        for tokens in ([6, 3], [5, 0]):
            torch.manual_seed(0)
            block = Qwen3VLMoeTextSparseMoeBlock(tcfg)
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0, 0.2)
                block.gate.weight[:2] = 1.0    # positive inputs: experts 0 and 1 (rank 0's) win
                block.gate.weight[2:] = -1.0
            ref = copy.deepcopy(block).double()
            moe.set_experts_implementation([ref.experts], fused=False)
            moe.set_experts_implementation([block.experts], fused=fused)
            apply_ep(block, None, dims)
            g = torch.Generator().manual_seed(1)
            xs = [torch.randn(1, t, H, generator=g).abs() for t in tokens]
            ws = [torch.linspace(-1, 1, t * H).view(1, t, H) for t in tokens]
            outs = []
            for x, w, t_ in zip(xs, ws, tokens):   # reference: every rank's tokens, grads summed
                x = x.double().requires_grad_(True)
                y = ref(x)
                if t_:
                    (y * w).sum().backward()
                outs.append((y.detach(), x.grad))
            r = dims.rank
            x = xs[r].clone().requires_grad_(True)
            y = block(x)
            (y * ws[r]).sum().backward()
            assert_close_scaled(y, outs[r][0], 1e-5, 1e-5, f"block out fused={fused} {tokens}")
            if tokens[r]:
                assert_close_scaled(x.grad, outs[r][1], 1e-5, 1e-5, f"block dx fused={fused} {tokens}")
            for name in ("gate_up_proj", "down_proj"):
                got = getattr(block.experts, name).grad.full_tensor()
                want = getattr(ref.experts, name).grad
                assert_close_scaled(got, want, 1e-5, 1e-5, f"block {name} fused={fused} {tokens}")
                assert float(got[2:].abs().max()) == 0.0   # rank 1's experts: no rows, zero grads
            n += 1
    return n


def _worker(suite: str, out: Path) -> None:
    import time

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from omnitune.checkpoint.dcp import save_checkpoint
    from omnitune.models.registry import get_family
    from omnitune.parallel.dims import ParallelDims
    from omnitune.parallel.mesh import init_distributed, shutdown
    from tolerance import assert_close_scaled

    d = init_distributed()
    dims = ParallelDims(world=d.world_size, ep=2).build("cpu")
    nproc, cases = SUITES[suite]
    assert d.world_size == nproc
    if suite == "ep2":
        n_block = _check_block_edge_cases(dims)
        if d.rank == 0:
            print(f"BLOCK_CHECKED {n_block}", flush=True)
    per_rank = 2
    for ci, (name, fused, image_in, recompute) in enumerate(cases):
        t0 = time.perf_counter()
        fam = get_family(name)
        mbs = micro_batches(fam, per_rank * dims.dp_cp, seed=ci, image_in=image_in)
        mine = mbs[per_rank * dims.dp_rank: per_rank * (dims.dp_rank + 1)]
        hf = tiny_model(fam, COEF)
        ref = copy.deepcopy(hf).double() if d.rank == 0 else None
        tm = build_ep(fam, hf, fused, dims, recompute)
        ex = tm.hf.model.language_model.layers[0].mlp.experts
        assert isinstance(ex.gate_up_proj, DTensor) and ex.gate_up_proj.shape[0] == 4
        assert ex.gate_up_proj.to_local().shape[0] == 4 // dims.dp_cp  # ep x FSDP shards of dim 0
        opt = optimizer(tm)
        grads = {}

        def capture(*_):  # step-1 gradients as the optimizer sees them (clipped)
            if not grads:
                grads.update({n: p.grad.full_tensor() for n, p in tm.hf.named_parameters() if p.grad is not None})
        hook = opt.register_step_pre_hook(capture)
        trainer = ep_trainer(dims, tm, opt, CLIP)
        stats = [trainer.train_step(mine) for _ in range(STEPS)]
        hook.remove()
        from omnitune.parallel.ep import ep_experts_modules
        sent = torch.tensor([sum(m._omnitune_ep.sent_rows for m in ep_experts_modules(tm))])
        dist.all_reduce(sent, op=dist.ReduceOp.MIN)
        assert int(sent) > 0  # every rank sent tokens to the other expert rank
        t_ep = time.perf_counter() - t0
        if d.rank == 0:
            losses, norms, want = reference_steps(fam, ref, mbs, STEPS)
            worst, worst_name, n = 0.0, "", 0
            for pname, w in want.items():
                g = grads.get(pname)
                assert g is not None, pname
                assert_close_scaled(g, w, rel=1e-5, scale=1e-5, msg=f"case {ci} {pname}")
                rel = float((g.double() - w).abs().max()) / max(float(w.abs().max()), 1e-30)
                if rel > worst:
                    worst, worst_name = rel, pname
                n += 1
            assert not (set(grads) - set(want)) or all(float(grads[k].abs().max()) == 0
                                                      for k in set(grads) - set(want))
            assert n > 10
            got_l = [s["loss"] for s in stats]
            got_n = [s["grad_norm"] for s in stats]
            assert abs(got_l[0] - losses[0]) <= 1e-5 * abs(losses[0]), (got_l, losses)
            for a, b in zip(got_l, losses):
                assert abs(a - b) <= 1e-4 * abs(b), (ci, got_l, losses)
            for a, b in zip(got_n, norms):
                assert abs(a - b) <= 1e-4 * abs(b), (ci, got_n, norms)
            assert norms[0] > CLIP  # clipping was active
            dl = max(abs(a - b) / abs(b) for a, b in zip(got_l, losses))
            print(f"CHECKED {suite} {name} fused={fused} image={bool(image_in)} recompute={recompute} grads={n} max_grad_diff/max={worst:.2e} ({worst_name}) "
                  f"loss_rel={dl:.2e} losses={[round(x, 6) for x in got_l]} norms={[round(x, 4) for x in got_n]} "
                  f"ep_s={t_ep:.1f} total_s={time.perf_counter() - t0:.1f}", flush=True)
        if ci == len(cases) - 1:
            save_checkpoint(out / "save", STEPS, tm.hf, opt, {})
            full = {n: p.full_tensor() for n, p in tm.hf.named_parameters()}
            if d.rank == 0:
                torch.save(full, out / "full.pt")
            _check_resume_at_ep(fam, fused, dims, out / "save", full, opt)
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(sys.argv[1], Path(sys.argv[2]))
