"""Per family, 2-process FSDP2 (torchrun, gloo): TrainModel + apply_fsdp + AdamW on processor-made
batches (all of the family's modalities on one rank while the other rank has a text-only
micro-batch, and the other way round), DCP save at step 5, loss falls over 10 steps; a fresh model
and optimizer loaded from the step-5 checkpoint reproduce steps 6..10 exactly; the export of step 10 reloads in plain transformers (Omni: the FULL
class, talker/vocoder untouched) with logits equal to ours.

This file is also the torchrun worker: ``python tests/test_family_fsdp.py <json args>``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ALL = ["qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe", "qwen2_vl"]
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")
STEPS, SAVE_AT, LR = 10, 5, 2e-3
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ worker
def _worker(cfg: dict) -> None:
    import time

    t0 = time.perf_counter()
    import torch.distributed as dist

    from omnitune.checkpoint import dcp as ckpt_io
    from omnitune.models.registry import get_family
    from omnitune.parallel.fsdp import apply_fsdp
    from omnitune.parallel.mesh import init_distributed, shutdown
    from omnitune.train.model import TrainModel, load_hf_model

    d = init_distributed()
    if os.environ.get("OMNITUNE_TEST_VERBOSE"):
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["OMNITUNE_TEST_VERBOSE"]), exit=True)
    fam = get_family(cfg["family"])
    micro = torch.load(cfg["batches"], weights_only=True)[d.rank]     # this rank's micro-batches
    verbose = os.environ.get("OMNITUNE_TEST_VERBOSE")

    def run(resume_from: int | None, stop: int, save_at: tuple[int, ...]) -> dict[int, float]:
        """Fresh model + optimizer (from the HF folder); resume_from: load that DCP checkpoint."""
        hf = load_hf_model(fam, cfg["hf_dir"])
        model = TrainModel(hf, fam)
        apply_fsdp(model, fam.fsdp_units(hf), d.mesh, bf16=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
        start = 0
        if resume_from is not None:
            meta = ckpt_io.load_checkpoint(Path(cfg["save"]) / ckpt_io.iter_dir_name(resume_from), hf, opt)
            start = meta["iteration"]
        losses = {}
        for it in range(start, stop):
            # one micro-batch per step, alternating: while one rank has media the other is text-only
            loss_sum, n, aux = model(micro[it % len(micro)])
            loss = loss_sum / n.clamp(min=1)
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            local = loss.detach().double()
            dist.all_reduce(local)
            losses[it + 1] = local.item() / d.world_size
            if verbose:
                print(f"rank {d.rank} step {it + 1} loss {losses[it + 1]:.6f} t={time.perf_counter() - t0:.1f}s",
                      file=sys.stderr, flush=True)
            if it + 1 in save_at:
                ckpt_io.save_checkpoint(cfg["save"], it + 1, hf, opt, {"hf_dir": cfg["hf_dir"]})
        return losses

    first = run(None, STEPS, (SAVE_AT, STEPS))
    resumed = run(SAVE_AT, STEPS, ())
    if d.rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"first": first, "resumed": resumed}))
    shutdown()


def _torchrun(cfg: dict, tmp: Path, tag: str) -> dict[str, dict[int, float]]:
    cfg = dict(cfg, out=str(tmp / f"losses_{tag}.json"))
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(Path(__file__).resolve()), json.dumps(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO / 'src'}{os.pathsep}"
               f"{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, f"{tag} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    res = json.loads(Path(cfg["out"]).read_text())
    return {run: {int(k): v for k, v in losses.items()} for run, losses in res.items()}


# ------------------------------------------------------------------------------------ test
@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_fsdp2_train_resume_export(name, tiny_model_dir, family_batch, tmp_path):
    from safetensors import safe_open

    from omnitune.checkpoint import dcp as ckpt_io
    from omnitune.checkpoint.export import export_hf
    from omnitune.models.registry import get_family
    from omnitune.train.model import load_hf_model

    fam = get_family(name)
    hf_dir = tiny_model_dir(name)
    full = family_batch(name, n=1, seed=1)
    text = family_batch(name, n=1, modalities=(), seed=2)
    full2 = family_batch(name, n=1, seed=3)
    text2 = family_batch(name, n=1, modalities=(), seed=4)
    # even steps: rank 0 media, rank 1 text-only; odd steps the other way -> encoders must line up
    torch.save([[full, text], [text2, full2]], tmp_path / "batches.pt")
    cfg = dict(family=name, hf_dir=str(hf_dir), batches=str(tmp_path / "batches.pt"), save=str(tmp_path / "ckpt"))
    res = _torchrun(cfg, tmp_path, "run")
    first, again = res["first"], res["resumed"]
    assert sorted(first) == list(range(1, STEPS + 1))
    assert first[STEPS - 1] + first[STEPS] < 0.9 * (first[1] + first[2]), first   # same data pairs
    assert sorted(again) == list(range(SAVE_AT + 1, STEPS + 1))
    for it, loss in again.items():
        assert loss == first[it], (it, loss, first[it])

    # export of step 10 -> plain transformers, logits equal to the trained model's
    assert (tmp_path / "ckpt" / ckpt_io.LATEST).read_text().strip() == str(STEPS)
    out = export_hf(tmp_path / "ckpt", tmp_path / "export", model_assets=hf_dir)
    from transformers import AutoConfig

    ours = load_hf_model(fam, None, AutoConfig.from_pretrained(hf_dir), init_weights=False)
    ckpt_io.load_model_weights_from_dcp(ckpt_io.resolve_checkpoint(tmp_path / "ckpt"), ours)
    plain = fam.folder_class().from_pretrained(out, dtype=torch.float32)
    assert type(plain).__name__ == (fam.hf_full_class_name or fam.hf_class_name)
    trained = getattr(plain, "thinker", plain)
    batch = {k: v for k, v in full.items() if k not in ("labels",)}
    ours.eval(), trained.eval()
    with torch.no_grad():
        a = ours(**batch).logits
        b = trained(**batch).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    with torch.no_grad():   # trained: the export differs from the original weights
        orig = fam.folder_class().from_pretrained(hf_dir)
        orig = getattr(orig, "thinker", orig)
        assert (orig(**batch).logits - b).abs().max() > 1e-3
    if name in OMNI:
        # FULL folder: talker / vocoder tensors bit-identical to the original, extra files kept
        def tensors(folder):
            res = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as s:
                    res.update({k: s.get_tensor(k) for k in s.keys()})
            return res
        src, dst = tensors(hf_dir), tensors(out)
        assert sorted(src) == sorted(dst)
        rest = [k for k in src if not k.startswith(fam.folder_prefix)]
        assert rest and all(torch.equal(src[k], dst[k]) for k in rest)
        assert any(not torch.equal(src[k], dst[k]) for k in src if k.startswith(fam.folder_prefix))
        # never-used parameters (Qwen2.5-Omni audio_bos_eos_token) are kept as they were
        unused = {id(p) for p in fam.unused_parameters(ours)}
        for pname, p in ours.named_parameters():
            if id(p) in unused:
                key = fam.folder_prefix + pname.replace("model.", "", 1)
                assert torch.equal(dst[key], src[key]), key
        assert len(unused) == (1 if name == "qwen2_5_omni" else 0)
        for extra in fam.folder_extra_files:
            assert (out / extra).read_bytes() == (hf_dir / extra).read_bytes()
        assert json.loads((out / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
