"""Loss types (SPEC section 7) across micro-batches, grad accumulation and data-parallel ranks.

The 2-rank test runs this file under torchrun: each rank takes 2 micro-batches of 2 samples with
uneven numbers of trained tokens, runs the trainer's ``train_step`` on a FSDP2 model, and rank 0
compares the logged loss and the full gradients with the definition computed by hand from plain
transformers logits on an unsharded copy of the model.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from omnitune.train.loss import IGNORE_INDEX, local_counts, token_weights

REPO = Path(__file__).resolve().parents[1]
PAD = 151643

# (sequence length incl. padding, prompt tokens, answer tokens) per sample; 4 micro-batches of 2.
SAMPLES = [
    [(5, 2, 3), (11, 3, 8)],
    [(9, 6, 3), (4, 2, 2)],
    [(12, 2, 10), (6, 4, 2)],
    [(7, 3, 4), (10, 9, 1)],
]


def micro_batches(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for mb in SAMPLES:
        S = max(n for n, _, _ in mb) + 1
        ids = torch.full((len(mb), S), PAD)
        labels = torch.full((len(mb), S), IGNORE_INDEX)
        att = torch.zeros((len(mb), S), dtype=torch.long)
        for b, (n, prompt, answer) in enumerate(mb):
            assert prompt + answer == n
            ids[b, :n] = torch.randint(100, 5000, (n,), generator=g)
            att[b, :n] = 1
            # trained: the answer tokens (a token t is predicted at position t-1)
            labels[b, prompt:n] = ids[b, prompt:n]
        out.append({"input_ids": ids, "attention_mask": att, "labels": labels})
    return out


def expected_loss(per_token: list[list[torch.Tensor]], loss_type: str) -> torch.Tensor:
    """Hand-written definitions. per_token[m][b]: token losses of sample b of micro-batch m."""
    if loss_type == "default":   # token mean per micro-batch, mean over micro-batches (grad-acc x DP)
        return torch.stack([torch.cat(mb).mean() for mb in per_token]).mean()
    if loss_type == "per_sample_loss":   # token mean per sample, mean over the global batch's samples
        return torch.stack([s.mean() for mb in per_token for s in mb]).mean()
    if loss_type == "per_token_loss":    # global sum / global token count
        allt = torch.cat([s for mb in per_token for s in mb])
        return allt.sum() / allt.numel()
    raise ValueError(loss_type)


def reference_per_token(model, mbs) -> list[list[torch.Tensor]]:
    out = []
    for mb in mbs:
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.double()
        rows = []
        for b in range(mb["input_ids"].shape[0]):
            lab = mb["labels"][b, 1:]
            keep = lab != IGNORE_INDEX
            rows.append(F.cross_entropy(logits[b, :-1][keep], lab[keep], reduction="none"))
        out.append(rows)
    return out


def test_token_weights_single_process_match_definitions():
    mbs = micro_batches()
    counts = local_counts([m["labels"] for m in mbs])
    # every answer token is trained (predicted from the position before it)
    assert counts.tolist() == [sum(a for mb in SAMPLES for _, _, a in mb), 8]
    torch.manual_seed(0)
    per_token = [[torch.rand(a) for _, _, a in mb] for mb in SAMPLES]
    for lt in ("default", "per_sample_loss", "per_token_loss"):
        total = 0.0
        for mb, pt in zip(mbs, per_token):
            w = token_weights(mb["labels"], lt, micro_batches=4, global_tokens=float(counts[0]),
                              global_samples=float(counts[1]))
            mask = mb["labels"][:, 1:] != IGNORE_INDEX
            wm = w[:, :-1][mask]
            total += float((wm * torch.cat(pt)).sum())
        assert abs(total - expected_loss(per_token, lt).item()) < 1e-6, lt
    # the three definitions differ on this batch, so the 2-rank test can tell them apart
    vals = {lt: expected_loss(per_token, lt).item() for lt in ("default", "per_sample_loss", "per_token_loss")}
    assert len({round(v, 6) for v in vals.values()}) == 3, vals


def test_flags_select_loss_type_and_conflicts_fail(tmp_path):
    from omnitune.config.errors import ConfigError
    from omnitune.config.model import ModelJson
    from omnitune.config.train import parse_train_args, resolve_loss_type

    base = ["--mm-data", "d.json", "--mm-model", "m.json", "--train-iters", "1"]
    cfg = ModelJson(model_id="qwen2vl")
    assert resolve_loss_type(parse_train_args(base)[0], cfg) == "default"
    assert resolve_loss_type(parse_train_args(base + ["--calculate-per-token-loss"])[0], cfg) == "per_token_loss"
    assert resolve_loss_type(parse_train_args(base + ["--calculate-per-sample-loss"])[0], cfg) == "per_sample_loss"
    cfg2 = ModelJson(model_id="qwen2vl", loss_cfg={"loss_type": "per_sample_loss"})
    assert resolve_loss_type(parse_train_args(base)[0], cfg2) == "per_sample_loss"
    with pytest.raises(ConfigError, match="contradicts --calculate-per-token-loss"):
        resolve_loss_type(parse_train_args(base + ["--calculate-per-token-loss"])[0], cfg2)
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_train_args(base + ["--calculate-per-token-loss", "--calculate-per-sample-loss"])


@pytest.mark.slow
def test_loss_types_two_ranks_two_micro_batches_match_hand_computed():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).resolve())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    checked = [line for line in r.stdout.splitlines() if line.startswith("CHECKED")]
    assert len(checked) == 5, r.stdout


# ----------------------------------------------------------------------------------- torchrun worker
def _worker() -> None:
    import torch.distributed as dist

    from omnitune.config.model import ModelJson
    from omnitune.models.registry import get_family
    from omnitune.parallel.fsdp import apply_fsdp
    from omnitune.parallel.mesh import init_distributed, shutdown
    from omnitune.train.model import TrainModel
    from omnitune.train.trainer import Trainer
    from tolerance import assert_close_scaled

    from omnitune.parallel.dims import ParallelDims

    d = init_distributed()
    dims = ParallelDims(world=d.world_size).build("cpu")
    fam = get_family("qwen2_vl")
    cfg = fam.tiny_config()
    mbs = micro_batches()
    mine = mbs[2 * d.rank: 2 * d.rank + 2]
    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    everything = {"image_encoder": {"vision_encoder": full, "vision_projector": full},
                  "text_decoder": {**full, "activation_offload": True}}
    # the last case also runs recompute of every module + activation offload under FSDP2
    cases = [("default", "default", {}), ("per_sample_loss", "default", {}), ("per_token_loss", "default", {}),
             ("per_sample_loss", "chunk", {}), ("per_token_loss", "dynamic_chunk", everything)]
    for loss_type, mode, modules in cases:
        torch.manual_seed(0)
        hf = fam.model_class()(cfg).float()
        hf.config.use_cache = False
        ref = copy.deepcopy(hf).double()  # the definition in float64: only our side carries fp32 error
        mcfg = ModelJson(model_id="qwen2vl", loss_cfg={"loss_type": loss_type, "compute_mode": mode, "chunk_size": 3},
                         **modules)
        tm = TrainModel(hf, fam, mcfg)
        if modules:
            assert tm.settings_report["text_decoder"] == {"recompute": 2, "offload": 2}
        apply_fsdp(tm, fam.fsdp_units(hf), d.mesh, False)
        t = Trainer.__new__(Trainer)
        t.args, t.d, t.model, t.optimizer, t.loss_type = SimpleNamespace(bf16=False, clip_grad=0.0), d, tm, None, loss_type
        t.dims = dims
        stats = t.train_step(mine)
        grads = {n: p.grad.full_tensor() for n, p in tm.hf.named_parameters() if p.grad is not None}
        if d.rank == 0:
            per_token = reference_per_token(ref, mbs)
            want = expected_loss(per_token, loss_type)
            want.backward()
            assert abs(stats["loss"] - want.item()) <= 1e-6 * abs(want.item()), (loss_type, stats["loss"], want.item())
            n = 0
            for name, p in ref.named_parameters():
                g = grads.get(name)
                if p.grad is None:
                    assert g is None or float(g.abs().max()) == 0.0, name
                    continue
                assert_close_scaled(g, p.grad, rel=1e-4, scale=1e-4, msg=f"{loss_type} {name}")
                n += 1
            assert n > 10
            print(f"CHECKED {loss_type} {mode} {sorted(modules)} loss={stats['loss']:.6f} grads={n}", flush=True)
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    _worker()


@pytest.mark.slow
def test_cli_training_chunk_recompute_offload_same_losses_as_plain(tiny_qwen2vl, tmp_path):
    """The real trainer (omnitune train, 1 process, grad-acc 2) with --calculate-per-token-loss: chunked
    loss + recompute of every module + activation offload give the plain run's losses step by step
    (step 2 onwards also depend on the step-1 gradients)."""
    import json

    from spine_util import losses, omnitune, train_flags, write_configs

    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    runs = {}
    for name in ("plain", "chunk_recompute_offload"):
        data_json, model_json = write_configs(tmp_path / name, tiny_qwen2vl)
        if name != "plain":
            m = json.loads(model_json.read_text())
            m["loss_cfg"] = {"compute_mode": "chunk", "chunk_size": 8}
            for enc in ("vision_encoder", "vision_projector"):
                m["image_encoder"][enc].update(full)
            m["text_decoder"].update(full, activation_offload=True)
            model_json.write_text(json.dumps(m))
        save = tmp_path / name / "save"
        omnitune(["train", *train_flags(data_json, model_json, iters=2, save=save, load=tiny_qwen2vl, mbs=2, gbs=4,
                                        extra=["--calculate-per-token-loss"])])
        runs[name] = losses(save)
    assert sorted(runs["plain"]) == [1, 2]
    for it in (1, 2):
        a, b = runs["plain"][it], runs["chunk_recompute_offload"][it]
        assert abs(a - b) <= 1e-5 * abs(a), (it, a, b)
