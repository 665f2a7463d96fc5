"""Ulysses context parallelism (parallel/cp.py, ops/ulysses.py).

One-process tests check the split/pad helpers. The torchrun tests train tiny models with the real
``Trainer.train_step`` under CP 2 (2 processes: Qwen2-VL image + video, Qwen3-VL-MoE with DeepStack
and a single kv head (repeated to cp), Qwen3-Omni-MoE with audio + image; one 4-process DP 2 x
CP 2 case) and compare, on rank 0, the step-1 loss and the full gradients with a float64
one-process reference (plain HF logits, the loss-type definition by hand), then the losses of
several AdamW steps. Micro-batches hold 2 samples with different padding, and some have an odd
length (padded to a multiple of cp inside the model).
"""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from omnitune.parallel.cp import (ContextParallel, local_chunk, local_masked_rows, pad_seq, padded_length)
from omnitune.train.loss import IGNORE_INDEX, shift_labels

REPO = Path(__file__).resolve().parents[1]
PAD = 151643


# ----------------------------------------------------------------------------------- one process
def test_pad_and_chunk_cover_the_padded_sequence():
    for s, cp in ((7, 2), (8, 2), (9, 4), (1, 2)):
        assert padded_length(s, cp) % cp == 0 and 0 <= padded_length(s, cp) - s < cp
        x = torch.arange(3 * s).view(3, s)
        chunks = [local_chunk(x, cp, r, dim=1, value=-1) for r in range(cp)]
        assert all(c.shape == (3, padded_length(s, cp) // cp) for c in chunks)
        full = torch.cat(chunks, dim=1)
        assert torch.equal(full[:, :s], x) and (full[:, s:] == -1).all()
        # sequence last, any leading dims (mRoPE ids [3 or 4, B, S])
        pos = torch.arange(4 * 3 * s).view(4, 3, s)
        assert torch.equal(torch.cat([local_chunk(pos, cp, r, -1) for r in range(cp)], -1)[..., :s], pos)
    m = torch.tensor([[True, False, True]])
    assert pad_seq(m, 5, 1, False).tolist() == [[True, False, True, False, False]]


def test_masked_rows_follow_their_positions():
    """DeepStack rows (one per True of visual_pos_masks, row-major) kept per chunk are the rows of
    the chunk's own True positions."""
    g = torch.Generator().manual_seed(0)
    b, s, h = 2, 9, 4
    mask = torch.rand(b, s, generator=g) > 0.4
    x = torch.randn(b, s, h, generator=g)
    rows = x[mask]
    for cp in (2, 3, 4):
        for r in range(cp):
            want = local_chunk(x, cp, r, 1)[local_chunk(mask, cp, r, 1, False)]
            assert torch.equal(local_masked_rows(rows, mask, cp, r), want), (cp, r)


def test_targets_are_shifted_on_the_full_sequence():
    """The last position of a chunk predicts the first token of the next chunk; the padding added
    for cp trains nothing; weights are chunked like the targets."""
    labels = torch.tensor([[IGNORE_INDEX, 11, 12, 13, 14, 15, 16], [IGNORE_INDEX, IGNORE_INDEX, 22, 23, 24,
                                                                     IGNORE_INDEX, IGNORE_INDEX]])
    weights = torch.rand(2, 7)
    parts = [ContextParallel(None, 2, r).shifted_local(labels, weights) for r in range(2)]
    assert parts[0][0].tolist() == [[11, 12, 13, 14], [IGNORE_INDEX, 22, 23, 24]]
    assert parts[1][0].tolist() == [[15, 16, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4]
    assert torch.equal(torch.cat([p[0] for p in parts], 1)[:, :7], shift_labels(labels))
    assert torch.equal(torch.cat([p[1] for p in parts], 1), F.pad(weights, (0, 1)))


def test_decoder_inputs_split_keeps_the_full_padding_mask():
    cp = ContextParallel(None, 2, 1)
    b, s, h = 2, 5, 3
    emb = torch.randn(b, s, h)
    pos = torch.arange(3 * b * s).view(3, b, s)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    vis = torch.tensor([[False, True, False, True, True], [True, False, False, True, False]])
    deep = [torch.arange(5.0 * h).view(5, h), -torch.arange(5.0 * h).view(5, h)]
    out = cp.split_decoder_inputs(dict(inputs_embeds=emb, position_ids=pos, attention_mask=mask,
                                       visual_pos_masks=vis, deepstack_visual_embeds=deep, use_cache=False),
                                  {"deepstack_visual_embeds": "visual_pos_masks"}, "sdpa")
    assert out["attention_mask"] is None and out["use_cache"] is False
    assert torch.equal(out["inputs_embeds"], torch.cat([emb[:, 3:], torch.zeros(b, 1, h)], 1))
    assert torch.equal(out["position_ids"], F.pad(pos, (0, 1))[..., 3:])
    assert out["visual_pos_masks"].tolist() == [[True, True, False], [True, False, False]]
    # rows of the True positions at sequence index >= 3: sample 0 -> rows 1, 2; sample 1 -> row 4
    assert all(torch.equal(o, d[[1, 2, 4]]) for o, d in zip(out["deepstack_visual_embeds"], deep))
    ctx = out["ulysses_ctx"]
    assert ctx.padding_mask.tolist() == [[True] * 5 + [False], [True] * 3 + [False] * 3]
    # no mask and no media: the decoder's default positions 0..S-1 of the full sequence
    out = cp.split_decoder_inputs(dict(inputs_embeds=emb), {}, "eager")
    assert out["position_ids"].tolist() == [[3, 4, 0]] * b
    assert out["ulysses_ctx"].padding_mask.tolist() == [[True] * 5 + [False]] * b


# ----------------------------------------------------------------------------------- torchrun tests
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _odd(batch: dict) -> dict:
    """The batch with one more padding position when its length is even (cp 2 must pad it)."""
    if batch["input_ids"].shape[1] % 2:
        return batch
    out = dict(batch)
    for k, value in (("input_ids", PAD), ("attention_mask", 0), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
        if k in out:
            out[k] = F.pad(out[k], (0, 1), value=value)
    return out


def _train_all(batch: dict) -> dict:
    """Every real token trained, so the positions at a chunk boundary carry a target."""
    out = dict(batch)
    out["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return out


def _run(nproc: int, case_file: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(Path(__file__).resolve()), str(case_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    return r.stdout


def _checked(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.startswith("CHECKED")]
    print("\n".join(lines))
    return lines


@pytest.mark.slow
def test_cp2_matches_one_process(family_batch, tmp_path):
    """CP 2 on 2 processes: Qwen2-VL (image + video, sdpa), Qwen3-VL-MoE (DeepStack image / image +
    video, eager, 1 kv head, layer recompute), Qwen3-Omni-MoE (audio + image, DeepStack, sdpa,
    left-padded by its processor: the padding mask matters)."""
    cases = [
        dict(family="qwen2_vl", loss_type="default", attn="sdpa", kv_heads=None,
             mbs=[family_batch("qwen2_vl", n=2, modalities=("image", "video"), seed=0),
                  _train_all(_odd(family_batch("qwen2_vl", n=2, modalities=("image",), seed=1)))]),
        dict(family="qwen3_vl_moe", loss_type="per_token_loss", attn="eager", kv_heads=1, recompute=True,
             mbs=[_odd(family_batch("qwen3_vl_moe", n=2, modalities=("image",), seed=0)),
                  _train_all(family_batch("qwen3_vl_moe", n=1, modalities=("image", "video"), seed=1))]),
        dict(family="qwen3_omni_moe", loss_type="per_sample_loss", attn="sdpa", kv_heads=None,
             mbs=[_odd(family_batch("qwen3_omni_moe", n=2, modalities=("audio", "image"), seed=0))]),
    ]
    assert any(mb["input_ids"].shape[1] % 2 for c in cases for mb in c["mbs"])
    # some chunk-boundary position has a target (it predicts the first token of the next chunk)
    assert any((shift_labels(mb["labels"])[:, padded_length(mb["labels"].shape[1], 2) // 2 - 1] != IGNORE_INDEX).any()
               for c in cases for mb in c["mbs"])
    assert all((mb["attention_mask"] == 0).any() for c in cases for mb in c["mbs"] if mb["input_ids"].shape[0] > 1)
    f = tmp_path / "cases.pt"
    torch.save({"world": 2, "cp": 2, "cases": cases}, f)
    assert len(_checked(_run(2, f))) == len(cases)


@pytest.mark.slow
def test_dp2_cp2_matches_one_process(family_batch, tmp_path):
    """4 processes, DP 2 x CP 2: each dp rank its own micro-batch, split over its 2 cp ranks."""
    mbs = [family_batch("qwen2_vl", n=2, modalities=("image",), seed=2),
           _train_all(_odd(family_batch("qwen2_vl", n=2, modalities=("image",), seed=3)))]
    cases = [dict(family="qwen2_vl", loss_type="per_token_loss", attn="sdpa", kv_heads=None, mbs=mbs)]
    f = tmp_path / "cases.pt"
    torch.save({"world": 4, "cp": 2, "cases": cases}, f)
    assert len(_checked(_run(4, f))) == 1


# ----------------------------------------------------------------------------------- torchrun worker
STEPS = 3
LR = 1e-3


def train_step(tm, d, dims, loss_type: str, micro_batches: list[dict]) -> float:
    """One step through the real ``Trainer.train_step`` (a Trainer made with ``__new__``, holding
    only what train_step reads, no optimizer: the caller steps it); returns the step's loss.
    train_step counts the data-parallel ranks (dims.dp) for the weights and scales the backward by
    dims.dp_cp, so the cp ranks' partial-sequence losses add up to the true loss."""
    from omnitune.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.args = SimpleNamespace(bf16=False, clip_grad=0.0)
    t.d, t.dims, t.model, t.optimizer, t.loss_type = d, dims, tm, None, loss_type
    stats = t.train_step(micro_batches)
    return stats["loss"]


def reference_loss(model, mbs: list[dict], loss_type: str) -> torch.Tensor:
    """The loss-type definition from plain HF logits (float64) of the whole micro-batches."""
    from test_loss_types import expected_loss

    per_token = []
    for mb in mbs:
        inputs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in mb.items() if k != "labels"}
        logits = model(**inputs).logits.double()
        rows = []
        for b in range(mb["input_ids"].shape[0]):
            lab = mb["labels"][b, 1:]
            keep = lab != IGNORE_INDEX
            rows.append(F.cross_entropy(logits[b, :-1][keep], lab[keep], reduction="none"))
        per_token.append(rows)
    return expected_loss(per_token, loss_type)


def _case(d, dims, case: dict) -> None:
    import torch.distributed as dist

    from omnitune.config.model import ModelJson
    from omnitune.models.registry import get_family
    from omnitune.ops.moe import experts_modules, set_experts_implementation
    from omnitune.parallel.cp import apply_cp
    from omnitune.parallel.fsdp import apply_fsdp
    from omnitune.train.model import TrainModel, load_hf_model
    from tolerance import assert_close_scaled

    fam = get_family(case["family"])
    cfg = fam.tiny_config()
    if case["kv_heads"]:
        fam.text_config(cfg).num_key_value_heads = case["kv_heads"]
    torch.manual_seed(0)
    hf = load_hf_model(fam, None, cfg, init_weights=False)
    assert all(torch.isfinite(p).all() for p in hf.parameters())
    # the reference is copied before TrainModel: recompute patches layer.forward with closures over
    # these layers (a deepcopy would still call them); experts: transformers' eager loop as ours
    ref = copy.deepcopy(hf).double()
    set_experts_implementation(experts_modules(ref), fused=False)
    dec = {"attn_implementation": case["attn"]}
    if case.get("recompute"):   # the recompute in backward runs Ulysses again with the same context
        dec.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    mcfg = ModelJson(model_id=fam.model_ids[0], loss_cfg={"loss_type": case["loss_type"]}, text_decoder=dec)
    tm = TrainModel(hf, fam, mcfg)
    if case.get("recompute"):
        assert tm.settings_report["text_decoder"]["recompute"] == 2
    lm = fam.language_model(hf)
    seen = []
    lm.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    assert apply_cp(tm, fam, dims.mesh["cp"]) is tm.cp
    assert lm.config._attn_implementation == "ulysses"
    apply_fsdp(tm, fam.fsdp_units(hf), dims.mesh["dp_cp"], False)
    opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=LR)

    mbs = case["mbs"]
    per_dp = len(mbs) // dims.dp
    mine = mbs[dims.dp_rank * per_dp:(dims.dp_rank + 1) * per_dp]
    losses, grads = [], None
    for step in range(STEPS):
        losses.append(train_step(tm, d, dims, case["loss_type"], mine))
        if step == 0:
            grads = {n: p.grad.full_tensor() for n, p in tm.hf.named_parameters() if p.grad is not None}
            want_len = [-(-mb["input_ids"].shape[1] // dims.cp) for mb in mine]
            assert seen == want_len, (seen, want_len)   # the decoder ran on this rank's chunk only
        opt.step()
        opt.zero_grad(set_to_none=True)
    if d.rank == 0:
        ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR)
        want = []
        for step in range(STEPS):
            loss = reference_loss(ref, mbs, case["loss_type"])
            loss.backward()
            want.append(loss.item())
            if step == 0:
                worst, n, zero = 0.0, 0, []
                top = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
                for name, p in ref.named_parameters():
                    g = grads.get(name)
                    if p.grad is None:
                        assert g is None or float(g.abs().max()) == 0.0, name
                        continue
                    assert g is not None, f"{name}: no gradient under CP"
                    if float(p.grad.abs().max()) < 1e-9 * top:
                        # zero up to rounding (e.g. the audio encoder's k_proj.bias: softmax ignores a
                        # per-query constant): no relative check possible, both must be ~0
                        assert float(g.abs().max()) < 1e-9 * top, (name, float(g.abs().max()), top)
                        zero.append(name)
                        continue
                    assert_close_scaled(g, p.grad, rel=1e-5, scale=1e-5, msg=f"{case['family']} {name}")
                    worst = max(worst, float((g.double() - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-30)))
                    n += 1
                assert n > 20
                assert abs(losses[0] - want[0]) <= 1e-5 * abs(want[0]), (losses[0], want[0])
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, want))
        assert rel <= 1e-4, (losses, want)
        print(f"CHECKED {case['family']} dp{dims.dp} cp{dims.cp} {case['loss_type']} {case['attn']} "
              f"{'recompute ' if case.get('recompute') else ''}"
              f"lengths={[mb['input_ids'].shape[1] for mb in mbs]} grads={n} (+{len(zero)} ~0: {zero}) "
              f"max|dgrad|/max|grad|={worst:.2e} loss rel diff over {STEPS} steps={rel:.2e} "
              f"losses={[round(x, 6) for x in losses]}", flush=True)
    dist.barrier()


def _worker(case_file: str) -> None:
    from omnitune.parallel.dims import ParallelDims
    from omnitune.parallel.mesh import init_distributed, shutdown

    spec = torch.load(case_file, weights_only=True)
    d = init_distributed()
    assert d.world_size == spec["world"]
    dims = ParallelDims(world=d.world_size, cp=spec["cp"]).build("cpu")
    for case in spec["cases"]:
        _case(d, dims, case)
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])
