"""DPO (train/dpo.py): the loss against a hand computation of its formula with policy and reference
log-probs computed here from plain HF forwards (every family, every loss type, label smoothing and
pref_ftx, chunked logits), shared pair media equal to repeated media, learning a separable
preference set, LoRA-DPO's reference without a second copy, resume, 1 vs 2 ranks, bad flags."""
from __future__ import annotations

import copy
import gc
import json
import math
from pathlib import Path

import pytest
import torch

from media_util import jpeg, mp4, wav
from omnitune.config.errors import ConfigError
from omnitune.models.registry import get_family
from spine_util import losses, omnitune, train_flags, write_configs

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni", "qwen3_omni_moe"]
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")
LORA = ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
PAIR_ATTR = {"ranking": True, "chosen": "chosen", "rejected": "rejected"}


def _pair_data(family_name: str, hf_dir: Path, root: Path) -> Path:
    """data.json of two pairs: one with an image and a video (Omni: and an audio), one text-only."""
    omni = family_name in OMNI
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    img = jpeg(media / "i.jpg", (56, 56), seed=1)
    vid = mp4(media / "v.mp4", n_frames=4, fps=4, size=(56, 56), seed=2)
    pairs = [{"messages": [{"role": "user", "content": "<image><video>" + ("<audio>" if omni else "") + "What is it?"}],
              "images": [img], "videos": [vid], **({"audios": [wav(media / "a.wav", seconds=1.0)]} if omni else {}),
              "chosen": "Coloured noise and bars.", "rejected": "A cat."},
             {"messages": [{"role": "user", "content": "Say hello."}], "chosen": "Hello there.",
              "rejected": "Go away now, please."}]
    (media / "pairs.json").write_text(json.dumps(pairs))
    attr = {"images": "images", "videos": "videos", "messages": "messages", "role_tag": "role",
            "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", **PAIR_ATTR,
            **({"audios": "audios"} if omni else {})}
    cfg = {"dataset_param": {
        "preprocess_parameters": {"model_name_or_path": str(hf_dir), "image_min_pixels": 28 * 28,
                                  "image_max_pixels": 64 * 64, "video_min_pixels": 28 * 28,
                                  "video_max_pixels": 64 * 64, "video_fps": 2.0, "video_maxlen": 8},
        "basic_parameters": {"template": get_family(family_name).template, "dataset_dir": str(media),
                             "dataset": "pairs.json"},
        "attr": attr}}
    out = root / "data.json"
    out.write_text(json.dumps(cfg))
    return out


def _hf_row_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent of train/: plain HF forward (media repeated per row), float64 log-softmax."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    logits = model(**inputs).logits.double()[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != -100
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1), mask.sum(-1)


def _by_hand(kind, beta, eps, ftx, pol, ref, n) -> list[float]:
    """The DPO formula per pair (docs/reference.md "DPO"), in Python floats."""
    b = len(pol) // 2
    out = []
    for k in range(b):
        pc, pr, rc, rr = pol[k], pol[b + k], ref[k], ref[b + k]
        nc, nr = n[k], n[b + k]
        if kind == "ipo":
            d = (pc / nc - rc / nc) - (pr / nr - rr / nr)
            loss = (d - 1 / (2 * beta)) ** 2
        else:
            d = (pc - rc) - (pr - rr)
            if kind == "sigmoid":
                logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
                loss = -logsig(beta * d) * (1 - eps) - logsig(-beta * d) * eps
            else:
                loss = max(0.0, 1 - beta * d)
        out.append(loss + ftx * (-pc / nc))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_dpo_loss_equals_the_formula_on_hf_log_probs(name, tiny_model_dir, tmp_path):
    from transformers import AutoProcessor

    from omnitune.config.data import load_data_config
    from omnitune.data import Collator
    from omnitune.data.dataset import build_train_dataset
    from omnitune.train.dpo import DpoSpec, pair_losses
    from omnitune.train.model import TrainModel, load_hf_model

    fam = get_family(name)
    hf_dir = tiny_model_dir(name)
    processor = AutoProcessor.from_pretrained(hf_dir)
    ds = build_train_dataset(load_data_config(_pair_data(name, hf_dir, tmp_path)), processor, 4096)
    items = [ds[0], ds[1]]
    pad = processor.tokenizer.pad_token_id
    shared = Collator(pad, share_pair_media=True)(items)
    repeated = Collator(pad)(items)
    assert shared["pair_media_shared"] and shared["pixel_values"].shape[0] * 2 == repeated["pixel_values"].shape[0]

    policy = load_hf_model(fam, str(hf_dir)).eval()
    reference = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        hand_pol, n = _hf_row_logps(policy, repeated)
        hand_ref, _ = _hf_row_logps(reference, repeated)
    assert n.tolist() == (shared["labels"][:, 1:] != -100).sum(-1).tolist() and (n > 0).all()

    pol_model, ref_model = TrainModel(policy, fam), TrainModel(reference, fam)
    for mode in ("default", "chunk"):
        pol_model.compute_mode = ref_model.compute_mode = mode
        pol_model.chunk_size = ref_model.chunk_size = 3
        with torch.no_grad():
            pol, pn, _ = pol_model(shared, per_row=True)
            ref, _, _ = ref_model(shared, per_row=True)
        assert pn.tolist() == n.tolist()
        # each row's log-prob (media encoded once per pair) = the plain HF one (media per row)
        torch.testing.assert_close(pol.double(), hand_pol, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ref.double(), hand_ref, rtol=1e-5, atol=1e-4)
        for kind, beta, eps, ftx in [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.7), ("ipo", 0.1, 0.0, 0.0),
                                     ("hinge", 0.05, 0.0, 0.3)]:
            spec = DpoSpec(beta, kind, eps, ftx, ("hf", str(hf_dir)))
            ours = pair_losses(spec, pol, ref, pn)["loss"]
            hand = _by_hand(kind, beta, eps, ftx, hand_pol.tolist(), hand_ref.tolist(), n.tolist())
            assert hand[0] != hand[1]
            torch.testing.assert_close(ours.double(), torch.tensor(hand, dtype=torch.float64), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{kind} beta {beta} eps {eps} ftx {ftx}: {m}")


def test_pair_losses_gradient_is_the_formula_gradient():
    """The backward the trainer runs: d loss / d policy log-probs is the analytic DPO gradient."""
    from omnitune.train.dpo import DpoSpec, pair_losses

    pol = torch.tensor([-5.0, -7.0, -6.5, -6.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-6.0, -6.5, -6.0, -6.2], dtype=torch.float64)
    beta, eps = 0.3, 0.1
    pair_losses(DpoSpec(beta, "sigmoid", eps, 0.0, ("hf", "x")), pol, ref, torch.ones(4))["loss"].sum().backward()
    for k in range(2):
        d = (pol[k] - ref[k] - pol[2 + k] + ref[2 + k]).item()
        s = 1 / (1 + math.exp(-beta * d))
        dd = -beta * ((1 - eps) * (1 - s) - eps * s)   # d loss / d d
        assert pol.grad[k].item() == pytest.approx(dd, rel=1e-6)
        assert pol.grad[2 + k].item() == pytest.approx(-dd, rel=1e-6)


# ------------------------------------------------------------------------------- training runs
def _separable(root: Path, hf_dir: Path) -> tuple[Path, Path]:
    """Preference pairs on the bundled demo images: the right description vs one fixed non-answer
    (separable: the policy only has to move away from that one answer)."""
    from omnitune.data import demo_data_dir

    data_json, model_json = write_configs(root, hf_dir)
    src = demo_data_dir()
    pairs = []
    for s in json.loads((src / "demo.json").read_text()):
        if not s.get("images"):
            continue
        pairs.append({"images": [str(src / s["images"][0])], "messages": [s["messages"][0]],
                      "chosen": {"role": "assistant", "content": s["messages"][1]["content"]},
                      "rejected": {"role": "assistant", "content": "I cannot tell."}})
    (root / "pairs.json").write_text(json.dumps(pairs[:16]))
    d = json.loads(data_json.read_text())
    d["dataset_param"]["basic_parameters"]["dataset"] = str(root / "pairs.json")
    d["dataset_param"]["attr"].update(PAIR_ATTR)
    data_json.write_text(json.dumps(d))
    return data_json, model_json


def _records(save: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_dpo_learns_a_separable_preference_set_with_recompute(tmp_path, tiny_qwen2vl):
    data_json, model_json = _separable(tmp_path, tiny_qwen2vl)
    m = json.loads(model_json.read_text())
    m["text_decoder"].update(recompute_granularity="full", recompute_method="uniform")
    model_json.write_text(json.dumps(m))
    save = tmp_path / "save"
    r = omnitune(["train", *train_flags(data_json, model_json, iters=10, save=save, load=tiny_qwen2vl, mbs=2, gbs=4,
                                        extra=["--dpo-beta", "0.1", "--min-lr", "1e-3", "--lr-warmup-fraction", "0"]),
                  "--no-progress-bar"])
    assert "dpo        : sigmoid, beta 0.1" in r.stdout and "reference: frozen copy of hf" in r.stdout
    assert "recompute" in r.stdout
    rec = _records(save)
    assert rec[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # policy == reference at the start
    assert rec[1]["rewards/accuracy"] == 0.0 and rec[1]["rewards/margin"] == 0.0
    assert [rec[i]["rewards/accuracy"] for i in (8, 9, 10)] == [1.0, 1.0, 1.0], rec
    assert rec[10]["rewards/margin"] > 2 * max(rec[2]["rewards/margin"], 0.05) and rec[10]["loss"] < rec[2]["loss"]
    assert "rewards/chosen:" in r.stdout and "rewards/accuracy: 1.0000" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(save / "tensorboard"))
    ea.Reload()
    assert len(ea.Scalars("train/rewards/margin")) == 10


@pytest.mark.slow
def test_dpo_two_ranks_match_one_rank(tmp_path, tiny_qwen2vl):
    """1 process (grad-acc 4) = DP 2 (grad-acc 2) = TP 2 (policy and reference tensor parallel)."""
    data_json, model_json = _separable(tmp_path, tiny_qwen2vl)
    got = {}
    for tag, extra in (("one", []), ("dp2", ["--nproc-per-node", "2"]),
                       ("tp2", ["--nproc-per-node", "2", "--tensor-model-parallel-size", "2"])):
        save = tmp_path / tag
        omnitune(["train", *extra,
                  *train_flags(data_json, model_json, iters=4, save=save, load=tiny_qwen2vl, mbs=1, gbs=4),
                  "--no-progress-bar"])
        got[tag] = _records(save)
    for tag in ("dp2", "tp2"):
        for i in range(1, 5):
            for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
                assert got[tag][i][key] == pytest.approx(got["one"][i][key], abs=1e-4), (tag, i, key)
    assert got["one"][4]["rewards/margin"] > 0


@pytest.fixture
def one_rank(monkeypatch):
    from omnitune.parallel.mesh import _free_port, init_distributed, shutdown

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    d = init_distributed()
    yield d
    shutdown()


def _storages(params) -> dict[int, int]:
    """data pointer -> bytes of the storages holding these parameters (DTensors: the local shard;
    FSDP2's unsharded copies are freed (0 bytes) between steps and do not count)."""
    out = {}
    for p in params:
        t = p.to_local() if hasattr(p, "to_local") else p
        st = t.untyped_storage()
        if st.nbytes():
            out[st.data_ptr()] = st.nbytes()
    return out


def _new_parameter_bytes(before: set[int]) -> int:
    """Bytes of parameter storage created since ``before`` (ids of the live parameters then)."""
    gc.collect()
    return sum(_storages(o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and id(o) not in before)
               .values())


def _live_ids() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)}


def test_lora_dpo_reference_is_the_base_without_a_second_copy(one_rank, tmp_path, tiny_qwen2vl):
    """Under LoRA the reference is the policy with its adapters off: no parameter beyond the
    policy's exists, and its log-probs are the base model's. Full DPO holds a frozen copy."""
    from omnitune.train.model import load_hf_model
    from omnitune.train.trainer import Trainer, make_plan

    data_json, model_json = _separable(tmp_path, tiny_qwen2vl)
    flags = train_flags(data_json, model_json, iters=2, save=tmp_path / "s", load=tiny_qwen2vl, mbs=2, gbs=2)
    fam = get_family("qwen2_vl")
    base_numel = sum(p.numel() for p in load_hf_model(fam, str(tiny_qwen2vl)).parameters())

    before = _live_ids()
    trainer = Trainer(make_plan(flags + LORA)[0], one_rank)
    trainer.fit()
    policy = sum(_storages(trainer.model.parameters()).values())
    assert trainer.ref_model is None and _new_parameter_bytes(before) == policy
    assert base_numel * 4 < policy < base_numel * 4 * 1.2   # the base + adapters, once (fp32)
    batch = next(iter(trainer._make_loader([[0, 1]])))
    ref_logp, _ = trainer.reference(batch)
    base = load_hf_model(fam, str(tiny_qwen2vl)).eval()
    with torch.no_grad():
        from omnitune.train.model import TrainModel
        base_logp, _, _ = TrainModel(base, fam)(batch, per_row=True)
        pol_logp, _, _ = trainer.model(batch, per_row=True)
    torch.testing.assert_close(ref_logp, base_logp, rtol=1e-5, atol=1e-4)
    assert (pol_logp - base_logp).abs().max() > 1e-4      # the adapters trained: the policy moved away
    del trainer
    gc.collect()

    before = _live_ids()
    full = Trainer(make_plan(flags)[0], one_rank)
    assert full.ref_model is not None and _new_parameter_bytes(before) == 2 * 4 * base_numel
    assert not any(p.requires_grad for p in full.ref_model.parameters())


def test_lora_dpo_resume_is_exact_and_exports(tmp_path, tiny_qwen2vl):
    data_json, model_json = _separable(tmp_path, tiny_qwen2vl)
    full, part = tmp_path / "full", tmp_path / "part"
    common = lambda save, iters, load: train_flags(data_json, model_json, iters=iters, save=save, load=load,  # noqa
                                                   mbs=2, gbs=2, extra=LORA + ["--pref-ftx", "0.5"])
    omnitune(["train", *common(full, 4, tiny_qwen2vl), "--no-progress-bar"])
    omnitune(["train", *common(part, 4, tiny_qwen2vl), "--exit-interval", "2", "--no-progress-bar"])
    r = omnitune(["train", *common(part, 4, part), "--no-progress-bar"])
    assert "resumed from" in r.stdout and "reference: the policy with its LoRA adapters off" in r.stdout
    a, b = _records(full), _records(part)
    for i in (3, 4):
        assert b[i]["loss"] == pytest.approx(a[i]["loss"], abs=1e-6) and \
            b[i]["rewards/margin"] == pytest.approx(a[i]["rewards/margin"], abs=1e-6)
    out = tmp_path / "merged"
    r = omnitune(["export", "--load", str(part), "--save", str(out), "--merge-lora"])
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def test_dpo_bad_flags_fail_before_launch(tmp_path, tiny_qwen2vl):
    from omnitune.train.trainer import make_plan

    data_json, model_json = _separable(tmp_path / "pairs", tiny_qwen2vl)
    sft_data, _ = write_configs(tmp_path / "sft", tiny_qwen2vl)
    base = train_flags(data_json, model_json, iters=2, save=tmp_path / "s", load=tiny_qwen2vl)
    cases = [
        (train_flags(sft_data, model_json, iters=2, save=tmp_path / "s", load=tiny_qwen2vl) + ["--dpo-beta", "0.2"],
         "--dpo-beta: DPO needs preference pairs, but"),
        (base + ["--dpo-loss-type", "kto"], "--dpo-loss-type: expected 'sigmoid', 'ipo' or 'hinge', got 'kto'"),
        (base + ["--pref-ftx", "-1"], "--pref-ftx: must be >= 0"),
        (base + ["--dpo-beta", "0"], "--dpo-beta: must be > 0"),
        (base + ["--dpo-label-smoothing", "0.6"], "--dpo-label-smoothing: must be <= 0.5"),
        (base + ["--dpo-loss-type", "ipo", "--dpo-label-smoothing", "0.1"], "only for --dpo-loss-type sigmoid"),
        (base + ["--ref-model", str(tmp_path / "nope")], "--ref-model"),
        (base + ["--context-parallel-size", "2"], "--context-parallel-size: not supported with DPO"),
        (base + LORA + ["--lora-target-modules", "no_such_module"], "--lora-target-modules"),
    ]
    for flags, expect in cases:
        with pytest.raises(ConfigError) as e:
            plan, _ = make_plan(flags, world_size=2 if "--context-parallel-size" in flags else 1)
            from omnitune.train.trainer import preflight
            preflight(plan)
        assert expect in str(e.value), (flags[-2:], str(e.value))
    r = omnitune(["train", *base, "--pref-ftx", "-1"], check=False)
    assert r.returncode == 2 and r.stderr.startswith("omnitune: error: --pref-ftx") and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_seed_dpo_flow_rlhfv_to_training_to_export(tmp_path, tiny_qwen2vl):
    """The seed's DPO section with paths changed: rlhfv_2_sharegpt_demo_format.py -> data_72b_dpo.json
    -> finetune_qwen2vl_72b_dpo.sh (a real torchrun, LoRA, reference = LOAD_PATH) -> merge_lora.sh."""
    import io
    import os
    import stat
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from omnitune.parallel.mesh import _free_port
    from spine_util import REPO
    from test_examples import EXAMPLES, _tiny_configs

    rows = []
    for k, (colour, name) in enumerate([((200, 10, 10), "red"), ((10, 10, 200), "blue")] * 2):
        buf = io.BytesIO()
        Image.new("RGB", (56, 56), colour).save(buf, format="JPEG")
        rows.append({"conversations": [{"from": "human", "value": "<image>What colour is it?"}],
                     "chosen": {"from": "gpt", "value": f"It is {name}."},
                     "rejected": {"from": "gpt", "value": "I cannot tell."},
                     "images": [{"bytes": buf.getvalue(), "path": None}]})
    folder = tmp_path / "data" / "datasets" / "rlhf-v" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    r = subprocess.run([sys.executable, str(EXAMPLES / "qwen2vl" / "rlhfv_2_sharegpt_demo_format.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "wrote 4 pairs; skipped 0" in r.stdout, r.stdout + r.stderr

    data_json, model_json = _tiny_configs("qwen2vl", "72b", tmp_path / "cfg", tiny_qwen2vl)
    d = json.loads(data_json.read_text())   # the seed's dataset paths (./data/rlhf-v.json), as the guide has them
    seed = json.loads((EXAMPLES / "qwen2vl" / "data_72b_dpo.json").read_text())["dataset_param"]["basic_parameters"]
    d["dataset_param"]["basic_parameters"].update(dataset_dir=seed["dataset_dir"], dataset=seed["dataset"])
    d["dataset_param"]["preprocess_parameters"].update(image_min_pixels=28 * 28, image_max_pixels=56 * 56)
    data_json.write_text(json.dumps(d))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, module in (("torchrun", "torch.distributed.run"), ("omnitune", "omnitune.cli.main")):
        exe = bindir / name
        exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    save = tmp_path / "save_dir"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", NPUS_PER_NODE="1", MASTER_PORT=str(_free_port()),
               MM_DATA=str(data_json), MM_MODEL=str(model_json), LOAD_PATH=str(tiny_qwen2vl), SAVE_PATH=str(save),
               OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(EXAMPLES / "qwen2vl" / "finetune_qwen2vl_72b_dpo.sh"), "--train-iters", "2",
                        "--global-batch-size", "2", "--seq-length", "512", "--num-workers", "0", "--lr", "1e-3",
                        "--no-progress-bar"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "reference: the policy with its LoRA adapters off (no second copy)" in r.stdout
    assert "rewards/accuracy:" in r.stdout and (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    out = tmp_path / "merged"
    env.update(HF_PATH=str(tiny_qwen2vl), OUTPUT_PATH=str(out))
    r = subprocess.run(["bash", str(REPO / "examples/qwen2vl/merge_lora.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"exported {out}" in r.stdout, r.stdout + r.stderr
    from transformers import Qwen2VLForConditionalGeneration
    assert Qwen2VLForConditionalGeneration.from_pretrained(out) is not None
