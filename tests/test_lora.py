"""LoRA (train/lora.py): target names per family, the freeze rule, adapter-only checkpoints with
exact resume, export as a peft adapter folder or merged HF folder (Omni: the full folder), 1 vs 2
ranks, bad flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from omnitune.config.errors import ConfigError
from omnitune.models.registry import get_family
from spine_util import losses, omnitune, train_flags, write_configs

LORA = ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe")

# Written out here, independently of the families' maps: the HF module name endings the four
# Megatron names must reach in each family (text decoder + ViT + projector (+ audio encoder)).
TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
EXPECTED_ENDINGS = {
    "qwen2_vl": TEXT + ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "merger.mlp.0", "merger.mlp.2"),
    "qwen2_5_vl": TEXT + ("attn.qkv", "attn.proj", "merger.mlp.0", "merger.mlp.2"),
    "qwen2_5_omni": TEXT + ("attn.q", "attn.k", "attn.v", "attn.proj", "merger.mlp.0", "merger.mlp.2",
                            "self_attn.out_proj", "fc1", "fc2"),
    "qwen3_vl": TEXT + ("attn.qkv", "attn.proj", "linear_fc1", "linear_fc2"),
    "qwen3_vl_moe": TEXT + ("attn.qkv", "attn.proj", "linear_fc1", "linear_fc2"),
    "qwen3_omni_moe": TEXT + ("attn.qkv", "attn.proj", "linear_fc1", "linear_fc2", "mlp.0", "mlp.2",
                              "self_attn.out_proj", "fc1", "fc2"),
}


def _meta_model(family):
    with torch.device("meta"):
        return family.model_class()._from_config(family.tiny_config(), dtype=torch.float32)


def _expected(model, family_name, skip_prefix=None):
    """{module path: (in, out)} of the Linear modules that should get adapters."""
    out = {}
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear) or (skip_prefix and n.startswith(skip_prefix)):
            continue
        if any(n.endswith("." + e) for e in EXPECTED_ENDINGS[family_name]):
            out[n] = (m.in_features, m.out_features)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_megatron_names_reach_the_expected_modules_and_count(name):
    from omnitune.train import lora

    fam = get_family(name)
    model = _meta_model(fam)
    want = _expected(model, name)
    names = lora.resolve_targets(model, fam, LORA[1:], frozen=set())
    assert set(names) == set(want)
    assert any(".visual.blocks." in n for n in names) and any("language_model" in n for n in names)
    spec = lora.LoraSpec(tuple(LORA[1:]), r=4, alpha=8, dropout=0.0)
    trainable = lora.apply_lora(model, spec, names, seed=1)
    assert trainable == sum(4 * (i + o) for i, o in want.values())
    assert all(lora.is_adapter_key(n) == p.requires_grad for n, p in model.named_parameters())

    # freeze rule: a frozen model.json module gets no adapter
    model = _meta_model(fam)
    names = lora.resolve_targets(model, fam, LORA[1:], frozen={"image_encoder.vision_encoder"})
    assert set(names) == set(_expected(model, name, skip_prefix="model.visual.blocks."))
    # an HF module name works too; every selected module frozen is an error naming the flag
    assert lora.resolve_targets(model, fam, ["q_proj"], set()) == [n for n in want if n.endswith(".q_proj")]
    with pytest.raises(ConfigError, match=r"--lora-target-modules linear_qkv: every module it selects is in a "
                                          r"frozen model.json module \(.*text_decoder"):
        lora.resolve_targets(model, fam, ["linear_qkv"], {g.name for g in fam.module_groups()})


def test_bad_lora_flags_fail_before_launch_naming_the_flag(tiny_qwen2vl, tmp_path, capsys):
    from omnitune.train.trainer import main

    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl)
    base = ["--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "1", "--dry-run"]
    cases = [
        (LORA + ["linear_bogus"], "--lora-target-modules linear_bogus: selects no Linear module of this qwen2_vl "
                                  "model; use one of linear_qkv, linear_proj, linear_fc1, linear_fc2"),
        (["--lora-r", "8"], "--lora-r: needs --lora-target-modules"),
        (LORA + ["--lora-r", "0"], "--lora-r"),
        (LORA + ["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size: not supported with "
                                                       "--lora-target-modules"),
        (LORA + ["--load-base-model", str(tmp_path)], f"--load-base-model {tmp_path}: the LoRA base must be"),
    ]
    for flags, msg in cases:
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("omnitune: error: ") and msg in err[0], (flags, err)
    assert main(base + LORA) == 0
    out = capsys.readouterr().out
    assert "lora       : 24 modules (linear_qkv linear_proj linear_fc1 linear_fc2), r 8, alpha 16" in out
    # 2 ViT blocks x 4 + 2 merger + 2 decoder layers x 7 Linear modules; trainable = sum r x (in + out)
    hf = get_family("qwen2_vl").load_pretrained(tiny_qwen2vl)
    want = _expected(hf, "qwen2_vl")
    assert len(want) == 24
    assert f"trainable adapter parameters {sum(8 * (i + o) for i, o in want.values()):,}" in out


@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank gloo group in this process (the trainer runs here: its model can be inspected)."""
    from omnitune.parallel.mesh import _free_port, init_distributed, shutdown

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    d = init_distributed()
    yield d
    shutdown()


def _train(d, flags):
    from omnitune.train.trainer import Trainer, make_plan

    trainer = Trainer(make_plan(flags)[0], d)
    return trainer, trainer.fit()


def _local(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ours(family, hf_dir, save):
    """The base model + the adapters of ``save``'s latest checkpoint, built here from the pieces."""
    from omnitune.checkpoint.dcp import load_model_weights_from_dcp, read_trainer_state, resolve_checkpoint
    from omnitune.train import lora
    from omnitune.train.model import load_hf_model

    ckpt = resolve_checkpoint(save)
    saved = read_trainer_state(ckpt)["lora"]
    model = load_hf_model(family, str(hf_dir))
    lora.apply_lora(model, lora.LoraSpec.from_json(saved), saved["modules"], seed=123)
    load_model_weights_from_dcp(ckpt, model, key_filter=lora.is_adapter_key)
    return model.eval()


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_qwen2vl_lora_base_frozen_resume_exact_adapter_and_merged_export(tiny_qwen2vl, tmp_path, one_rank,
                                                                          family_batch):
    from peft import PeftModel
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import Qwen2VLForConditionalGeneration

    from omnitune.checkpoint.export import export_hf
    from omnitune.train import lora
    from omnitune.train.trainer import make_plan

    fam = get_family("qwen2_vl")
    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl, freeze={"image_encoder.vision_encoder": True})

    def flags(save, load, *extra):
        return train_flags(data_json, model_json, iters=4, save=save, load=load, gbs=2,
                           extra=[*LORA, "--save-interval", "2", *extra])

    straight = tmp_path / "straight"
    trainer, ref = _train(one_rank, flags(straight, tiny_qwen2vl))
    assert len(ref) == 4 and ref[-1] < ref[0]
    # trainable = the adapters of the unfrozen modules, counted from the module shapes
    base = fam.load_pretrained(tiny_qwen2vl)
    want = _expected(base, "qwen2_vl", skip_prefix="model.visual.blocks.")
    got = {n: p for n, p in trainer.model.hf.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in got.values()) == sum(8 * (i + o) for i, o in want.values())
    assert all(lora.is_adapter_key(n) for n in got)
    # base weights bit-identical after training; the adapters moved
    base_sd = dict(base.named_parameters())
    n_base = 0
    for n, p in trainer.model.hf.named_parameters():
        if lora.is_adapter_key(n):
            if ".lora_B." in n:
                assert _local(p).abs().sum() > 0, n
            continue
        assert torch.equal(_local(p.detach()).cpu(), base_sd[n.replace(".base_layer", "")].detach()), n
        n_base += 1
    assert n_base == len(base_sd)

    # the checkpoint: adapter tensors and their AdamW moments only
    keys = list(FileSystemReader(str(straight / "iter_0000004")).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) == 2 * len(want) and all(lora.is_adapter_key(k) for k in model_keys)
    assert all(lora.is_adapter_key(k) for k in keys if k.startswith("optim.state."))

    # stop at 2, resume from the save dir: the same losses, bit for bit
    stopped = tmp_path / "stopped"
    _, first = _train(one_rank, flags(stopped, tiny_qwen2vl, "--exit-interval", "2"))
    _, rest = _train(one_rank, flags(stopped, stopped))
    assert first + rest == ref
    # resuming with other LoRA flags, or without them, is refused naming what to pass
    with pytest.raises(ConfigError, match=r"trained with --lora-target-modules linear_qkv .* --lora-r 8"):
        make_plan(flags(stopped, stopped, "--lora-r", "4"))
    with pytest.raises(ConfigError, match=r"holds LoRA adapters only; resume it with the flags it was trained "
                                          r"with: --lora-target-modules"):
        make_plan(train_flags(data_json, model_json, iters=4, save=stopped, load=stopped))

    # export: a peft adapter folder, and the merged HF folder
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    export_hf(straight, adapter)
    _merge_lora_script(straight, tiny_qwen2vl, merged, tmp_path)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert not (adapter / "config.json").exists() and (adapter / "tokenizer.json").is_file()
    batch = _inputs(family_batch("qwen2_vl", n=2, modalities=("image",)))
    ours = _ours(fam, tiny_qwen2vl, straight)
    with torch.no_grad():
        a = ours(**batch).logits
        with lora.adapters_disabled(ours):    # the DPO reference: the base model, no copy
            b0 = ours(**batch).logits
        ref_base = base.eval()(**batch).logits
        peft_model = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl),
                                               str(adapter)).eval()
        p = peft_model(**batch).logits
        m = Qwen2VLForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()(**batch).logits
    assert torch.equal(b0, ref_base) and (a - ref_base).abs().max() > 1e-4
    assert (a - p).abs().max().item() < 1e-5
    assert (a - m).abs().max().item() < 1e-5
    # merged: frozen ViT blocks bit-identical to the base, adapted modules changed
    with safe_open(str(merged / "model.safetensors"), "pt") as f, \
            safe_open(str(tiny_qwen2vl / "model.safetensors"), "pt") as g:
        vit = [k for k in g.keys() if k.startswith("visual.blocks.")]
        assert vit and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in vit)
        assert not torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                               g.get_tensor("model.layers.0.self_attn.q_proj.weight"))


def _merge_lora_script(save, hf_dir, out, tmp_path):
    """examples/qwen2vl/merge_lora.sh as a user runs it (`omnitune` on PATH)."""
    import os
    import stat
    import subprocess
    import sys

    from spine_util import REPO

    bindir = tmp_path / "bin_omnitune"
    bindir.mkdir()
    exe = bindir / "omnitune"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m omnitune.cli.main \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SAVE_PATH=str(save), HF_PATH=str(hf_dir),
               OUTPUT_PATH=str(out))
    r = subprocess.run(["bash", str(REPO / "examples/qwen2vl/merge_lora.sh")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"exported {out}" in r.stdout, r.stdout + r.stderr


LORA_SCRIPTS = {("qwen2vl", "2b"): "finetune_qwen2vl_2b_lora.sh", ("qwen2.5vl", "3b"): "finetune_qwen2_5_vl_3b_lora.sh",
                ("qwen2.5omni", "7b"): "finetune_qwen2_5_omni_7b_lora.sh", ("qwen3vl", "8B"): "finetune_qwen3vl_8B_lora.sh",
                ("qwen3omni", "30B-A3B"): "finetune_qwen3omni_lora.sh"}


def test_every_family_has_lora_and_merge_scripts_with_the_same_lora_flags():
    """Each LoRA script is its family's finetune script plus the same LoRA block (the dry run below
    runs two of them), and each family folder has merge_lora.sh calling export --merge-lora."""
    from test_examples import CASES, EXAMPLES

    block = None
    for (folder, size), script in LORA_SCRIPTS.items():
        text = (EXAMPLES / folder / script).read_text()
        lora_block = text[text.index('LORA_ARGS="'):text.index('"', text.index('LORA_ARGS="') + 11)]
        assert block in (None, lora_block), script
        block = lora_block
        assert "    $LORA_ARGS \\\n" in text and "    --init-model-with-meta-device" not in text, script
        base = (EXAMPLES / folder / CASES[folder, size][2]).read_text()
        assert f"--mm-model $MM_MODEL" in base and "--mm-model $MM_MODEL" in text
        merge = (EXAMPLES / folder / "merge_lora.sh").read_text()
        assert "omnitune export" in merge and "--merge-lora" in merge, folder
    assert "--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2" in block


@pytest.mark.parametrize("folder,size", [("qwen2vl", "2b"), ("qwen3omni", "30B-A3B")])
def test_lora_example_scripts_dry_run(folder, size, tmp_path, tiny_model_dir):
    """Each family's finetune_*_lora.sh with a stand-in `torchrun` (omnitune.train --dry-run)."""
    import os
    import stat
    import subprocess
    import sys

    from omnitune.models.registry import family_for_model_id
    from test_examples import CASES, EXAMPLES, _tiny_configs

    family = family_for_model_id(json.loads((EXAMPLES / folder / CASES[folder, size][1]).read_text())["model_id"])
    hf_dir = tiny_model_dir(family.name)
    data_json, model_json = _tiny_configs(folder, size, tmp_path / "cfg", hf_dir)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "torchrun"
    fake.write_text(f"#!/bin/sh\nwhile [ \"$1\" != \"-m\" ]; do shift; done\nshift 2\n"
                    f"exec {sys.executable} -m omnitune.train \"$@\" --dry-run\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", NPUS_PER_NODE="1", MM_DATA=str(data_json),
               MM_MODEL=str(model_json), LOAD_PATH=str(hf_dir), SAVE_PATH=str(tmp_path / "save"))
    r = subprocess.run(["bash", str(EXAMPLES / folder / LORA_SCRIPTS[folder, size])], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"model      : {family.name}" in r.stdout
    assert "(linear_qkv linear_proj linear_fc1 linear_fc2), r 8, alpha 16" in r.stdout
    assert "trainable adapter parameters" in r.stdout and f"lora base  : hf {hf_dir}" in r.stdout
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize("name", ["qwen2_5_omni", "qwen3_vl_moe"])
def test_family_lora_export_merged_and_adapter_logits(name, tiny_model_dir, tmp_path, one_rank, family_batch):
    """Omni: the merged export is the FULL folder (talker and vocoder untouched, thinker. keys) and
    the adapter folder loads with peft on the full model."""
    import transformers
    from peft import PeftModel
    from safetensors import safe_open

    from omnitune.checkpoint.export import export_hf

    fam = get_family(name)
    hf_dir = tiny_model_dir(name)
    data_json, model_json = write_configs(tmp_path, hf_dir, family=name)
    save = tmp_path / "save"
    _, run = _train(one_rank, train_flags(data_json, model_json, iters=2, save=save, load=hf_dir, gbs=2,
                                          extra=LORA))
    assert len(run) == 2
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    export_hf(save, adapter)
    export_hf(save, merged, merge_lora=True)
    cls = fam.folder_class()
    assert cls is getattr(transformers, fam.hf_full_class_name or fam.hf_class_name)
    batch = _inputs(family_batch(name, n=2, modalities=("image",)))
    ours = _ours(fam, hf_dir, save)

    def run_logits(model):
        return (model.thinker if fam.folder_prefix else model)(**batch).logits

    with torch.no_grad():
        a = ours(**batch).logits
        m = run_logits(cls.from_pretrained(merged, dtype=torch.float32).eval())
        p = run_logits(PeftModel.from_pretrained(cls.from_pretrained(hf_dir, dtype=torch.float32),
                                                 str(adapter)).eval().base_model.model)
    assert (a - m).abs().max().item() < 1e-5
    assert (a - p).abs().max().item() < 1e-5
    if fam.folder_prefix:   # everything outside the thinker bit-identical; the thinker keys kept
        def tensors(folder):
            out = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as s:
                    out.update({k: s.get_tensor(k) for k in s.keys()})
            return out
        before, after = tensors(hf_dir), tensors(merged)
        assert before.keys() == after.keys()
        rest = [k for k in before if not k.startswith(fam.folder_prefix)]
        assert rest and all(torch.equal(before[k], after[k]) for k in rest)
        for f in fam.folder_extra_files:
            assert (merged / f).read_bytes() == (hf_dir / f).read_bytes()


@pytest.mark.slow
def test_one_vs_two_ranks_same_lora_losses(tiny_qwen2vl, tmp_path):
    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl)
    runs = {}
    for nproc in (1, 2):
        save = tmp_path / f"save_{nproc}"
        omnitune(["train", "--nproc-per-node", str(nproc),
                  *train_flags(data_json, model_json, iters=3, save=save, load=tiny_qwen2vl, gbs=2, extra=LORA)])
        runs[nproc] = losses(save)
    assert sorted(runs[1]) == [1, 2, 3]
    for it in (1, 2, 3):
        assert abs(runs[1][it] - runs[2][it]) <= 1e-4 * abs(runs[1][it]), (it, runs)
    assert runs[1][3] < runs[1][1]
