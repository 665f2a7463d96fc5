"""Checkpoint safety: a checkpoint folder runs no code (a pickle payload as ``.metadata`` or as a
non-tensor ``.distcp`` entry is refused by train --load, export --load and every DCP-reading
converter, and the payload's marker file is never created), and damaged checkpoints or save
locations give one clear error naming the file (exit 2) instead of a traceback: truncated
``.distcp`` / ``.metadata``, a garbage ``latest_checkpointed_iteration.txt``, a corrupt
``trainer_state.json``, a read-only ``--save``, a disk that fills up during a save."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from omnitune.checkpoint import dcp as ck
from omnitune.checkpoint import safe_dcp
from omnitune.cli.main import main as cli_main
from omnitune.cli.mm_convert import main as mm_convert
from spine_util import train_flags, write_configs

LATEST = "latest_checkpointed_iteration.txt"


class _Payload:
    """Unpickling it creates ``marker`` (what an attacker's code would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _plant_metadata(folder: Path, marker: Path) -> Path:
    f = folder / ".metadata"
    f.write_bytes(pickle.dumps(_Payload(marker)))
    return f


def _dist_env(mp) -> None:
    """A one-rank group on loopback for the trainer run in this process (restored afterwards)."""
    from omnitune.parallel.mesh import _free_port

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        mp.setenv(k, v)


@pytest.fixture(scope="module")
def run(tiny_qwen2vl, tmp_path_factory):
    """A real 2-iteration training save (iter_0000001 and iter_0000002) and the configs it used."""
    from omnitune.train import trainer

    root = tmp_path_factory.mktemp("ckpt_safety")
    data_json, model_json = write_configs(root / "cfg", tiny_qwen2vl)
    save = root / "save"
    with pytest.MonkeyPatch.context() as mp:
        _dist_env(mp)
        rc = trainer.main(train_flags(data_json, model_json, iters=2, save=save, load=tiny_qwen2vl, gbs=1,
                                      extra=["--save-interval", "1"]))
    assert rc == 0 and (save / LATEST).read_text() == "2"
    return dict(save=save, data=data_json, model=model_json, hf=tiny_qwen2vl)


def _copy(run, tmp_path: Path) -> Path:
    dst = tmp_path / "save"
    shutil.copytree(run["save"], dst)
    return dst


def _train(run, load: Path, save: Path, *extra: str) -> int:
    return cli_main(["train", *train_flags(run["data"], run["model"], iters=3, save=save, load=load, gbs=1,
                                           extra=list(extra))])


def _export(load: Path, out: Path) -> int:
    return cli_main(["export", "--load", str(load), "--save", str(out)])


def _one_line_error(capsys, prefix: str = "omnitune: error: ") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(prefix), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


# ------------------------------------------------------------------------------------ no code
def test_the_payload_is_live_under_plain_pickle(tmp_path):
    """What the refusals below stop: plain pickle (torch's FileSystemReader) runs it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_real_metadata_passes_the_restricted_unpickler(run):
    """Our own saves (model + AdamW state, torch's dcp.save) unpickle to the same Metadata."""
    for it in ("iter_0000001", "iter_0000002"):
        folder = run["save"] / it
        md = safe_dcp.read_metadata(folder)
        with open(folder / ".metadata", "rb") as f:
            ref = pickle.load(f)
        assert md.state_dict_metadata == ref.state_dict_metadata and md.storage_data == ref.storage_data
        assert any(k.startswith("optim.param_groups.") for k in md.state_dict_metadata)


@pytest.mark.parametrize("where", ["train --load", "export --load"])
def test_metadata_payload_is_refused_by_train_and_export(run, tmp_path, capsys, where):
    save = _copy(run, tmp_path)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    bad = _plant_metadata(save / "iter_0000002", marker)
    if where == "train --load":
        rc = _train(run, save, tmp_path / "out")
    else:
        rc = _export(save, tmp_path / "export")
    assert rc == 2
    assert not marker.exists()
    msg = _one_line_error(capsys)
    assert f"{bad}: refuses to unpickle builtins.exec: not DCP metadata" in msg
    assert not (tmp_path / "export").exists() and not (tmp_path / "out" / "iter_0000003").exists()


def test_metadata_payload_is_refused_by_train_load_of_a_dcp_release(run, tmp_path, capsys):
    """--load of a MindSpeed-MM DCP folder (mm-convert hf_to_dcp: release/, no trainer state)."""
    root = tmp_path / "dcp"
    (root / "release").mkdir(parents=True)
    (root / LATEST).write_text("release")
    marker = tmp_path / "pwned"
    bad = _plant_metadata(root / "release", marker)
    assert _train(run, root, tmp_path / "out") == 2
    assert not marker.exists()
    assert f"{bad}: refuses to unpickle builtins.exec" in _one_line_error(capsys)


@pytest.mark.parametrize("conv", ["Qwen3VLConverter", "ExpertMergeDcpConverter"])
def test_metadata_payload_is_refused_by_every_dcp_converter(tiny_model_dir, tmp_path, capsys, conv):
    iter_dir = tmp_path / "ckpt" / "iter_0000005"
    iter_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    bad = _plant_metadata(iter_dir, marker)
    out = tmp_path / "hf_out"
    if conv == "Qwen3VLConverter":
        argv = [conv, "dcp_to_hf", "--load_dir", str(iter_dir), "--save_dir", str(out),
                "--model_assets_dir", str(tiny_model_dir("qwen3_vl"))]
    else:
        argv = [conv, "dcp_to_hf", "--hf_dir", str(tiny_model_dir("qwen3_omni_moe")), "--dcp_dir", str(iter_dir),
                "--save_dir", str(out)]
    assert mm_convert(argv) == 2
    assert not marker.exists() and not out.exists()
    assert f"{bad}: refuses to unpickle builtins.exec" in _one_line_error(capsys, "mm-convert: error: ")


def test_every_dcp_read_path_refuses_the_payload(run, tmp_path):
    """Below the CLI's pre-launch check: the resume load, the export load, the meta-init load and
    the converters' index each read .metadata through the restricted unpickler."""
    from transformers import AutoConfig

    from omnitune.checkpoint.sharded_load import _load_training_dcp
    from omnitune.convert.dcp_io import DcpIndex
    from omnitune.models.registry import family_for_hf_config
    from omnitune.train.model import load_hf_model

    save = _copy(run, tmp_path)
    ckpt = save / "iter_0000002"
    marker = tmp_path / "pwned"
    bad = _plant_metadata(ckpt, marker)
    config = AutoConfig.from_pretrained(run["hf"])
    model = load_hf_model(family_for_hf_config(config), None, config, init_weights=False)
    calls = {"load_checkpoint": lambda: ck.load_checkpoint(ckpt, model, None, load_optim=False),
             "load_model_weights_from_dcp": lambda: ck.load_model_weights_from_dcp(ckpt, model),
             "meta-init resume": lambda: _load_training_dcp(save, model, {}),
             "DcpIndex": lambda: DcpIndex(ckpt)}
    for name, call in calls.items():
        with pytest.raises(safe_dcp.CheckpointError, match="refuses to unpickle builtins.exec") as e:
            call()
        assert str(bad) in str(e.value), name
    assert not marker.exists()


def _tiny_save(root: Path):
    from omnitune.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8, allow_empty=False)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ck.save_checkpoint(root, 1, model, opt, {"consumed_samples": 4})
    return model, opt


def test_distcp_bytes_payload_is_refused_on_resume(tmp_path):
    """A non-tensor entry (the optimizer's lr) replaced by a payload: torch's DefaultLoadPlanner
    would torch.load it with weights_only=False; ours refuses it naming the .distcp file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    model, opt = _tiny_save(tmp_path)
    ckpt = tmp_path / "iter_0000001"
    sd: dict = {}   # everything in it (our own, trusted file)
    _load_state_dict(sd, storage_reader=FileSystemReader(str(ckpt)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    marker = tmp_path / "pwned"
    # optimizer state is saved flat (checkpoint/dcp.py optim_state): "param_groups.<parameter>.lr"
    lr_key = next(k for k in sd["optim"] if k.startswith("param_groups.") and k.endswith(".lr"))
    sd["optim"][lr_key] = _Payload(marker)
    for f in ckpt.glob("*.distcp"):
        f.unlink()
    dcp.save(sd, checkpoint_id=str(ckpt), no_dist=True)
    safe_dcp.read_metadata(ckpt)  # the metadata itself is clean
    with pytest.raises(safe_dcp.CheckpointError, match=r"\.distcp: entry 'optim\.param_groups\.[\w.]+\.lr' refused "
                                                        r"by torch\.load\(weights_only=True\)"):
        ck.load_checkpoint(ckpt, model, opt)
    assert not marker.exists()
    # the same file through torch's default reader and planner does run it (the payload is harmless)
    _load_state_dict({}, storage_reader=FileSystemReader(str(ckpt)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    assert marker.exists()


# ------------------------------------------------------------------------------------ damaged files
def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated .distcp", "truncated .metadata", "garbage latest",
                                    "corrupt trainer_state.json"])
@pytest.mark.parametrize("where", ["train --load", "export --load"])
def test_damaged_checkpoint_is_one_clear_error(run, tmp_path, capsys, damage, where):
    save = _copy(run, tmp_path)
    ckpt = save / "iter_0000002"
    if damage == "truncated .distcp":
        bad = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
        _truncate(bad)
        expect = f"{bad}: truncated: "
    elif damage == "truncated .metadata":
        bad = ckpt / ".metadata"
        _truncate(bad)
        expect = f"{bad}: truncated or not DCP metadata"
    elif damage == "garbage latest":
        bad = save / LATEST
        bad.write_bytes(b"\xffgarbage\n")
        expect = f"{bad}: holds "
    else:
        bad = ckpt / "trainer_state.json"
        bad.write_text('{"iteration": 2, ')
        expect = f"{bad}: not valid JSON"
    out = tmp_path / "out"
    rc = _train(run, save, out) if where == "train --load" else _export(save, out)
    assert rc == 2
    msg = _one_line_error(capsys)
    assert expect in msg, msg
    assert "; " in msg.split(expect, 1)[1]   # the fix follows
    assert not (out / "iter_0000003").exists() and not (out / "config.json").exists()


def test_corrupt_distcp_of_the_right_size_names_the_file(run, tmp_path, capsys):
    """Garbage bytes of the right length pass the size check; decoding them names the file."""
    save = _copy(run, tmp_path)
    bad = max((save / "iter_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    bad.write_bytes(b"\0" * bad.stat().st_size)
    assert _export(save, tmp_path / "out") == 2
    msg = _one_line_error(capsys)
    assert f"{bad}: cannot be decoded" in msg and not (tmp_path / "out").exists()


def test_garbage_latest_is_named_by_mm_convert(tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / LATEST).write_text("five")
    assert mm_convert(["Qwen3VLConverter", "dcp_to_hf", "--load_dir", str(root), "--save_dir", str(tmp_path / "o"),
                       "--model_assets_dir", str(tiny_model_dir("qwen3_vl"))]) == 2
    msg = _one_line_error(capsys, "mm-convert: error: ")
    assert f"{root / LATEST} holds 'five', not an iteration number" in msg


@pytest.mark.parametrize("op", ["mm_to_hf", "resplit"])
def test_garbage_latest_is_named_by_mm_to_hf_and_resplit(tiny_model_dir, tmp_path, capsys, op):
    """The Megatron-layout readers check latest_checkpointed_iteration.txt the same way."""
    root = tmp_path / "mm"
    root.mkdir()
    (root / LATEST).write_bytes(b"\xffgarbage\n")
    hf = str(tiny_model_dir("qwen2_vl"))
    out = ["--cfg.save_hf_dir", str(tmp_path / "o")] if op == "mm_to_hf" else \
        ["--cfg.target_dir", str(tmp_path / "o"), "--cfg.target_parallel_config.tp_size", "1",
         "--cfg.target_parallel_config.llm_pp_layers", "[2]", "--cfg.target_parallel_config.vit_pp_layers", "[2]"]
    src = ["--cfg.mm_dir", str(root)] if op == "mm_to_hf" else ["--cfg.source_dir", str(root)]
    pc = "parallel_config" if op == "mm_to_hf" else "source_parallel_config"
    rc = mm_convert(["Qwen2VLConverter", op, *src, "--cfg.hf_config.hf_dir", hf,
                     f"--cfg.{pc}.tp_size", "1", f"--cfg.{pc}.llm_pp_layers", "[2]",
                     f"--cfg.{pc}.vit_pp_layers", "[2]", *out])
    assert rc == 2
    msg = _one_line_error(capsys, "mm-convert: error: ")
    assert "not an iteration number" in msg and str(root / LATEST) in msg
    assert not (tmp_path / "o").exists()


def test_data_file_outside_the_folder_is_refused(tmp_path):
    """A .metadata whose entries point outside the checkpoint folder (../) is not read."""
    import dataclasses

    _tiny_save(tmp_path)
    ckpt = tmp_path / "iter_0000001"
    md = safe_dcp.read_metadata(ckpt)
    md.storage_data = {k: dataclasses.replace(v, relative_path="../../etc/passwd") for k, v in md.storage_data.items()}
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(safe_dcp.CheckpointError, match="outside the checkpoint folder"):
        safe_dcp.read_metadata(ckpt)


# ------------------------------------------------------------------------------------ save location
def _ro_mount(path: Path) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_read_only_save_is_refused_before_training(run, tmp_path, capsys):
    ro = tmp_path / "ro"
    if not _ro_mount(ro):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        for argv_extra in ([], ["--dry-run"]):
            assert _train(run, run["hf"], ro / "save", *argv_extra) == 2
            msg = _one_line_error(capsys)
            assert msg.startswith(f"omnitune: error: --save {ro / 'save'}: {ro} is not writable (Read-only file "
                                  f"system); ")
        assert _export(run["save"], ro / "export") == 2
        assert f"--save {ro / 'export'}: {ro} is not writable" in _one_line_error(capsys)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_save_under_a_file_is_refused_before_training(run, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert _train(run, run["hf"], f / "save", "--dry-run") == 2
    assert f"--save {f / 'save'}: {f} is not a folder" in _one_line_error(capsys)


# ------------------------------------------------------------------------------------ disk full
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stage", ["shards", "rng", "latest"])
def test_disk_full_during_a_save_loses_nothing_and_says_so(tmp_path, monkeypatch, stage):
    import torch.distributed.checkpoint.filesystem as fs

    model, opt = _tiny_save(tmp_path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with monkeypatch.context() as mp:
        if stage == "shards":
            mp.setattr(fs, "_write_item", _enospc)
        elif stage == "rng":
            real = torch.save
            mp.setattr(ck.torch, "save", lambda obj, f, *a, **k: _enospc() if "rng" in str(f) else real(obj, f, *a, **k))
        else:
            mp.setattr(ck, "write_text_atomic", _enospc)
        with pytest.raises(safe_dcp.CheckpointError) as e:
            ck.save_checkpoint(tmp_path, 2, model, opt, {"consumed_samples": 8})
    left = ("iter_0000002 written but not made the latest" if stage == "latest" else "iter_0000002.partial left")
    assert str(e.value) == (f"--save {tmp_path}: disk full while saving iter_0000002: {left}, {LATEST} still names "
                            f"iter_0000001; free space and resume with --load {tmp_path}")
    assert (tmp_path / LATEST).read_text() == "1"
    assert (tmp_path / "iter_0000002.partial").exists() == (stage != "latest")
    meta = ck.load_checkpoint(ck.resolve_checkpoint(tmp_path), model, opt)
    assert meta["iteration"] == 1 and meta["consumed_samples"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_disk_full_during_training_exits_2_with_the_message(run, tmp_path, monkeypatch, capsys):
    """The trainer (in this process): the second save hits ENOSPC; exit 2, the first stays latest."""
    import torch.distributed.checkpoint.filesystem as fs

    from omnitune.train import trainer

    real_save, calls = ck.save_checkpoint, []

    def second_save_hits_enospc(*a, **k):   # the first save is written, the second is not
        calls.append(1)
        if len(calls) == 2:
            monkeypatch.setattr(fs, "_write_item", _enospc)
        return real_save(*a, **k)

    monkeypatch.setattr(ck, "save_checkpoint", second_save_hits_enospc)
    _dist_env(monkeypatch)
    save = tmp_path / "save"
    rc = trainer.main(train_flags(run["data"], run["model"], iters=2, save=save, load=run["hf"], gbs=1,
                                  extra=["--save-interval", "1"]))
    assert rc == 2
    msg = _one_line_error(capsys)
    assert msg == (f"omnitune: error: --save {save}: disk full while saving iter_0000002: iter_0000002.partial left, "
                   f"{LATEST} still names iter_0000001; free space and resume with --load {save}")
    assert (save / LATEST).read_text() == "1" and (save / "iter_0000001" / ".metadata").is_file()
    assert json.loads((save / "iter_0000001" / "trainer_state.json").read_text())["iteration"] == 1


def test_real_disk_full_on_a_small_tmpfs(tmp_path):
    """The same with a real full file system (a 1 MiB tmpfs filled up after the first save)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        save = disk / "save"
        model, opt = _tiny_save(save)
        with open(disk / "filler", "wb", buffering=0) as f:   # take every free block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        with pytest.raises(safe_dcp.CheckpointError, match=r"disk full while saving iter_0000002: "
                                                            r"iter_0000002\.partial left, latest_checkpointed_"
                                                            r"iteration\.txt still names iter_0000001; free space"):
            ck.save_checkpoint(save, 2, model, opt, {"consumed_samples": 8})
        assert (save / LATEST).read_text() == "1"
        (disk / "filler").unlink()
        assert ck.load_checkpoint(ck.resolve_checkpoint(save), model, opt)["iteration"] == 1
        ck.save_checkpoint(save, 2, model, opt, {"consumed_samples": 8})   # space freed: the save works
        assert (save / LATEST).read_text() == "2" and not (save / "iter_0000002.partial").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)
