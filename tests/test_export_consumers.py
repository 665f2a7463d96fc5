"""Exports every consumer loads, and the seed's post-training step on omnitune's own save dirs.

- ``mm-convert <Family>Converter mm_to_hf --cfg.mm_dir SAVE_DIR`` on a training save dir (DCP,
  ``iter_XXXXXXX`` + latest_checkpointed_iteration.txt) writes the same folder as ``omnitune export``:
  tensor for tensor, file for file (Qwen2-VL, and Qwen2.5-Omni's full folder: thinker trained,
  talker + token2wav + spk_dict.pt kept).
- Both are the original HF folder with its weights replaced: the same safetensors files holding the
  same names in the same order, every other file (config, tokenizer, processor, generation config,
  chat template) byte for byte; nothing re-saved through transformers 5.
- ``resplit`` from a save dir writes the requested Megatron layout (= hf_to_mm of the export).
- With transformers 4.57 in a side venv (``$OMNITUNE_TF4_PYTHON`` or /work/venv457/bin/python):
  a folder that 4.57 saved (Qwen2-VL, Qwen2.5-Omni, Qwen2.5-VL, Qwen3-VL) still loads there, with a
  forward, after export / mm_to_hf / dcp_to_hf (tools/check_tf457.py). Skipped when that venv is absent.
- Stacked MoE experts keep the original folder's layout (the Hub's [E, in, out]).

The save dirs are written by ``checkpoint.dcp.save_checkpoint`` (what the trainer calls) from the
folder's model with every parameter moved by +0.01, so the trained tensors are known exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from omnitune.cli.main import main as cli_main
from omnitune.cli.mm_convert import main as mm_convert

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "check_tf457.py"
CONVERTER = {"qwen2_vl": "Qwen2VLConverter", "qwen2_5_omni": "Qwen2_5_OmniConverter",
             "qwen2_5_vl": "Qwen2_5_VLConverter"}
# families whose tiny folders transformers 4.57 can re-save (its Qwen3-VL-MoE / Qwen3-Omni-MoE
# configs and expert layouts differ from transformers 5's: not covered by tools/check_tf457.py resave)
TF457_FAMILIES = ["qwen2_vl", "qwen2_5_omni", "qwen2_5_vl", "qwen3_vl"]
SEED_LAYOUT = ["--cfg.parallel_config.llm_pp_layers", "[2]", "--cfg.parallel_config.vit_pp_layers", "[2]",
               "--cfg.parallel_config.tp_size", "1"]
SHIFT = 0.01


def tf4_python() -> str | None:
    p = os.environ.get("OMNITUNE_TF4_PYTHON") or "/work/venv457/bin/python"
    return p if Path(p).is_file() else None


def make_save(family: str, hf_dir: Path, save: Path, record_hf_dir: bool = True) -> Path:
    """A training save dir of ``hf_dir``'s model with every parameter + SHIFT (iteration 3)."""
    from omnitune.checkpoint import dcp as ck
    from omnitune.models.registry import get_family
    from omnitune.train.model import load_hf_model

    model = load_hf_model(get_family(family), str(hf_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(SHIFT)
    state = {"hf_dir": str(hf_dir)} if record_hf_dir else {}
    ck.save_checkpoint(save, 3, model, None, state, save_optim=False, save_rng=False)
    return save


def mm_to_hf(family: str, mm_dir: Path, hf_dir: Path, out: Path, layout=SEED_LAYOUT) -> int:
    return mm_convert([CONVERTER[family], "mm_to_hf", "--cfg.mm_dir", str(mm_dir), "--cfg.hf_config.hf_dir",
                       str(hf_dir), "--cfg.save_hf_dir", str(out), *layout])


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def header_keys(f: Path) -> list[str]:
    """Tensor names of a safetensors file in the order of its header."""
    import struct

    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return list(header)


def assert_is_original_with_trained_weights(out: Path, hf_dir: Path, prefix: str) -> None:
    """``out`` = ``hf_dir`` with the tensors under ``prefix`` (all when empty) moved by SHIFT."""
    from safetensors.torch import load_file

    assert files(out) == files(hf_dir)
    for name in files(hf_dir):
        if name.endswith(".safetensors"):
            assert header_keys(out / name) == header_keys(hf_dir / name), name
            got, orig = load_file(out / name), load_file(hf_dir / name)
            for k, t in orig.items():
                want = t + SHIFT if k.startswith(prefix) and t.is_floating_point() else t
                assert got[k].dtype == t.dtype and torch.equal(got[k], want), (name, k)
        else:  # carried over unchanged
            assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name


@pytest.fixture(scope="module")
def saves(tiny_model_dir, tmp_path_factory):
    """family -> (hf_dir, save_dir), built once per module."""
    root = tmp_path_factory.mktemp("consumer_saves")
    cache = {}

    def get(family: str):
        if family not in cache:
            hf = tiny_model_dir(family)
            cache[family] = (hf, make_save(family, hf, root / family))
        return cache[family]
    return get


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_omni"])
def test_mm_to_hf_on_a_training_save_is_omnitune_export(family, saves, tmp_path, capsys):
    from omnitune.models.registry import get_family

    hf, save = saves(family)
    assert cli_main(["export", "--load", str(save), "--save", str(tmp_path / "export")]) == 0
    assert mm_to_hf(family, save, hf, tmp_path / "mm_to_hf") == 0
    assert "is an omnitune training save (iter_0000003" in capsys.readouterr().err
    for name in files(tmp_path / "export"):
        assert (tmp_path / "export" / name).read_bytes() == (tmp_path / "mm_to_hf" / name).read_bytes(), name
    prefix = get_family(family).folder_prefix or ""
    assert_is_original_with_trained_weights(tmp_path / "export", hf, prefix)
    assert_is_original_with_trained_weights(tmp_path / "mm_to_hf", hf, prefix)
    # an iteration folder works the same way
    assert mm_to_hf(family, save / "iter_0000003", hf, tmp_path / "from_iter") == 0
    assert (tmp_path / "from_iter" / "model.safetensors").read_bytes() == (tmp_path / "export" / "model.safetensors").read_bytes()


def test_transformers_5_loads_the_export(saves, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    hf, save = saves("qwen2_vl")
    assert mm_to_hf("qwen2_vl", save, hf, tmp_path / "out") == 0
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = Qwen2VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    w = dict(model.named_parameters())
    for k, p in ref.named_parameters():
        assert torch.equal(w[k], p + SHIFT), k


def test_resplit_of_a_training_save_writes_the_target_layout(saves, tmp_path, capsys):
    hf, save = saves("qwen2_vl")
    layout = ["--cfg.parallel_config.llm_pp_layers", "[[1,1]]", "--cfg.parallel_config.vit_pp_layers", "[[2,0]]",
              "--cfg.parallel_config.tp_size", "2"]
    target = ["--cfg.target_parallel_config.llm_pp_layers", "[[1,1]]",
              "--cfg.target_parallel_config.vit_pp_layers", "[[2,0]]", "--cfg.target_parallel_config.tp_size", "2"]
    assert mm_convert(["Qwen2VLConverter", "resplit", "--cfg.source_dir", str(save), "--cfg.target_dir",
                       str(tmp_path / "resplit"), "--cfg.source_parallel_config.llm_pp_layers", "[2]",
                       "--cfg.source_parallel_config.vit_pp_layers", "[2]", *target]) == 0
    assert "source_parallel_config is ignored" in capsys.readouterr().err
    assert cli_main(["export", "--load", str(save), "--save", str(tmp_path / "export")]) == 0
    assert mm_convert(["Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "ref"),
                       "--cfg.hf_config.hf_dir", str(tmp_path / "export"), *layout]) == 0
    got, ref = files(tmp_path / "resplit"), files(tmp_path / "ref")
    assert got == ref and len([f for f in got if f.endswith("model_optim_rng.pt")]) == 4
    for name in got:
        if name.endswith(".pt"):
            a = torch.load(tmp_path / "resplit" / name, weights_only=True)["model"]
            b = torch.load(tmp_path / "ref" / name, weights_only=True)["model"]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not [p for p in tmp_path.iterdir() if ".hf-" in p.name]  # the scratch export is gone
    # and back: mm_to_hf of that layout gives the export's weights
    assert mm_to_hf("qwen2_vl", tmp_path / "resplit", hf, tmp_path / "back", layout) == 0
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_dir_errors_name_the_folder_and_the_fix(tiny_model_dir, saves, tmp_path, capsys):
    hf, save = saves("qwen2_vl")
    # the wrong converter for the folder's family
    assert mm_convert(["Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", str(save), "--cfg.hf_config.hf_dir",
                       str(hf), "--cfg.save_hf_dir", str(tmp_path / "out"), *SEED_LAYOUT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mm-convert: error: hf_config.hf_dir=") and "is a qwen2_vl model" in err[-1]
    assert not (tmp_path / "out").exists()
    # resplit of a save dir that does not record its HF folder, without --cfg.hf_config.hf_dir
    bare = make_save("qwen2_vl", hf, tmp_path / "bare", record_hf_dir=False)
    assert mm_convert(["Qwen2VLConverter", "resplit", "--cfg.source_dir", str(bare), "--cfg.target_dir",
                       str(tmp_path / "t"), "--cfg.source_parallel_config.llm_pp_layers", "[2]",
                       "--cfg.source_parallel_config.vit_pp_layers", "[2]",
                       "--cfg.target_parallel_config.llm_pp_layers", "[2]",
                       "--cfg.target_parallel_config.vit_pp_layers", "[2]"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"mm-convert: error: source_dir={bare} is an omnitune training save (iter_0000003, DCP, "
                    f"layout-free) whose original HF folder is unknown; add --cfg.hf_config.hf_dir "
                    f"<original HF folder>")
    assert not (tmp_path / "t").exists()
    # a save dir whose latest_checkpointed_iteration.txt names a missing iteration
    import shutil
    stale = tmp_path / "stale"
    shutil.copytree(save, stale)
    (stale / "latest_checkpointed_iteration.txt").write_text("9")
    assert mm_to_hf("qwen2_vl", stale, hf, tmp_path / "out") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"mm-convert: error: {stale} is an omnitune training save, but its latest_checkpointed_iteration.txt "
                    f"names '9', which is not a complete checkpoint there; write one of its iterations (3) into it")
    assert not (tmp_path / "out").exists()
    # a non-empty output is refused before any work
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert mm_to_hf("qwen2_vl", save, hf, tmp_path / "full") == 2
    assert "save_hf_dir=" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "x"


@pytest.mark.skipif(tf4_python() is None, reason="no transformers 4.57 venv (/work/venv457 or OMNITUNE_TF4_PYTHON)")
def test_transformers_457_loads_exports_of_folders_it_saved(tmp_path, tiny_model_dir):
    """Input: the tiny folders re-saved by transformers 4.57 itself (a transformers-5 folder does not
    load there). omnitune (transformers 5) trains from them; export, mm_to_hf of the save dir (Qwen3-VL:
    dcp_to_hf) and the Megatron round trip hf_to_mm -> mm_to_hf must all load in 4.57 and run a forward."""
    py = tf4_python()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    v4 = {f: tmp_path / f"{f}_tf457" for f in TF457_FAMILIES}
    args = [a for f in TF457_FAMILIES for a in (str(tiny_model_dir(f)), str(v4[f]))]
    r = subprocess.run([py, str(TOOL), "resave", *args], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = []
    for family, hf in v4.items():
        save = make_save(family, hf, tmp_path / f"{family}_save")
        exp, m2h = tmp_path / f"{family}_export", tmp_path / f"{family}_mm_to_hf"
        assert cli_main(["export", "--load", str(save), "--save", str(exp)]) == 0
        if family == "qwen3_vl":   # its seed converter
            assert mm_convert(["Qwen3VLConverter", "dcp_to_hf", "--load_dir", str(save), "--save_dir", str(m2h),
                               "--model_assets_dir", str(hf)]) == 0
        else:
            assert mm_to_hf(family, save, hf, m2h) == 0
        for out in (exp, m2h):   # the 4.57 files are carried over unchanged
            for name in files(hf):
                if not name.endswith(".safetensors"):
                    assert (out / name).read_bytes() == (hf / name).read_bytes(), (out, name)
        outs += [exp, m2h]
    mm = tmp_path / "qwen2_vl_mm"
    assert mm_convert(["Qwen2VLConverter", "hf_to_mm", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir",
                       str(v4["qwen2_vl"]), *SEED_LAYOUT]) == 0
    assert mm_to_hf("qwen2_vl", mm, v4["qwen2_vl"], tmp_path / "qwen2_vl_megatron_hf") == 0
    outs.append(tmp_path / "qwen2_vl_megatron_hf")
    r = subprocess.run([py, str(TOOL), "check", *map(str, outs)], capture_output=True, text=True, env=env,
                       timeout=900)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(x) for x in results))
    assert len(results) == len(outs) and all(x["ok"] for x in results), (r.stdout, r.stderr[-3000:])
    assert all(x["transformers"].startswith("4.") for x in results)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe"])
def test_export_is_the_original_folder_with_trained_weights(family, tiny_model_dir, tmp_path):
    """The other families: same files, names and order; every non-weight file byte for byte
    (Qwen3-Omni: the full folder, talker and code2wav untouched)."""
    from omnitune.models.registry import get_family

    hf = tiny_model_dir(family)
    save = make_save(family, hf, tmp_path / "save")
    assert cli_main(["export", "--load", str(save), "--save", str(tmp_path / "export")]) == 0
    assert_is_original_with_trained_weights(tmp_path / "export", hf, get_family(family).folder_prefix or "")


def test_export_keeps_the_hub_layout_of_stacked_experts(tiny_model_dir, tmp_path):
    """A Qwen3-VL-MoE folder in the transformers 4.x / Hub layout (experts [E, in, out]; transformers
    5 transposes them on load): the export writes the trained experts back in that layout."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("qwen3_vl_moe")
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    sd = load_file(src / "model.safetensors")
    flipped = {k: (t.transpose(1, 2).contiguous() if ".experts." in k and t.dim() == 3 else t) for k, t in sd.items()}
    assert any(flipped[k].shape != sd[k].shape for k in sd)
    save_file(flipped, str(hub / "model.safetensors"), metadata={"format": "pt"})
    save = make_save("qwen3_vl_moe", hub, tmp_path / "save")
    assert cli_main(["export", "--load", str(save), "--save", str(tmp_path / "export")]) == 0
    assert_is_original_with_trained_weights(tmp_path / "export", hub, "")


def test_a_wrong_original_folder_is_refused_naming_the_flag(saves, tmp_path, capsys):
    """Omni: a --model-assets / hf_config.hf_dir whose thinker lacks a tensor of the checkpoint is
    refused (exit 2, one line naming the flag as typed), nothing written."""
    import shutil

    from safetensors.torch import load_file, save_file

    hf, save = saves("qwen2_5_omni")
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    sd = load_file(hf / "model.safetensors")
    dropped = next(k for k in sd if k.startswith("thinker.model.layers.0."))
    save_file({k: t for k, t in sd.items() if k != dropped}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert cli_main(["export", "--load", str(save), "--save", str(tmp_path / "e"), "--model-assets", str(bad)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"omnitune: error: --model-assets {bad}: the trained thinker and this folder disagree "
                           f"on 1 tensor names") and last.endswith("pass the folder training started from")
    assert mm_to_hf("qwen2_5_omni", save, bad, tmp_path / "m") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"mm-convert: error: hf_config.hf_dir={bad}: the trained thinker")
    assert not (tmp_path / "e").exists() and not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_an_original_with_other_tensor_names_keeps_transformers_weight_files(saves, tmp_path, capsys):
    """A non-Omni original whose names are not what transformers saves (here: one renamed) cannot be
    laid out tensor for tensor: the export says so and keeps transformers' own weight files, still
    with the original's config and tokenizer files; transformers loads it with the trained weights."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import Qwen2VLForConditionalGeneration

    hf, save = saves("qwen2_vl")
    odd = tmp_path / "odd"
    shutil.copytree(hf, odd)
    sd = load_file(hf / "model.safetensors")
    k0 = next(iter(sd))
    sd["renamed." + k0] = sd.pop(k0)
    save_file(sd, str(odd / "model.safetensors"), metadata={"format": "pt"})
    assert cli_main(["export", "--load", str(save), "--save", str(tmp_path / "e"), "--model-assets", str(odd)]) == 0
    assert "omnitune: warning: the trained tensor names differ" in capsys.readouterr().err
    assert (tmp_path / "e" / "config.json").read_bytes() == (odd / "config.json").read_bytes()
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "e", dtype=torch.float32)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    w = dict(model.named_parameters())
    assert all(torch.equal(w[k], p + SHIFT) for k, p in ref.named_parameters())
    assert not (tmp_path / "e" / ".trainable").exists()
