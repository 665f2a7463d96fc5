"""Bad flags and configs: one line naming the flag as typed (or the file + key path) and the fix,
exit status 2; --dry-run refuses what the run refuses; a config error under torchrun ends its
output; data inspect decodes what training decodes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from omnitune.config.errors import ConfigError
from omnitune.config.train import TrainArgs, parse_train_args
from omnitune.data.formats import DataError
from omnitune.train.trainer import make_plan
from media_util import jpeg, write_config
from spine_util import REPO, omnitune, write_configs

BASE = ["--mm-data", "d.json", "--mm-model", "m.json", "--train-iters", "2"]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr: must be >= 0.0, got -1"),
    (["--num-workers", "-2"], "--num-workers: must be >= 0, got -2"),
    (["--clip-grad", "-0.5"], "--clip-grad: must be >= 0.0, got -0.5"),
    (["--weight-decay", "-1e-2"], "--weight-decay: must be >= 0.0, got -1e-2"),
    (["--eval-iters", "-1"], "--eval-iters: must be >= 0, got -1"),
    (["--eval-interval", "0"], "--eval-interval: must be >= 1, got 0"),
    (["--save-interval", "0", "--save", "s"], "--save-interval: must be >= 1, got 0"),
    (["--log-interval", "0"], "--log-interval: must be >= 1, got 0"),
    (["--adam-beta1", "1"], "--adam-beta1: must be < 1.0, got 1"),
    (["--adam-beta2", "-0.1"], "--adam-beta2: must be >= 0.0, got -0.1"),
    (["--adam-eps", "0"], "--adam-eps: must be > 0.0, got 0"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size: must be >= 1, got 0"),
    (["--context-parallel-size", "-2"], "--context-parallel-size: must be >= 1, got -2"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction: must be <= 1.0, got 1.5"),
    (["--micro-batch-size", "abc"], "--micro-batch-size: expected an integer, got 'abc'"),
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--lr-decay-style", "step"], "--lr-decay-style: expected 'cosine', 'linear' or 'constant', got 'step'"),
    (["--min-lr", "1"], "--min-lr 1.0: must be <= --lr 1e-05"),
    (["--global-batch-size", "1", "--micro-batch-size", "2"], "--global-batch-size 1: must be >= --micro-batch-size 2"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--lr"], "--lr: expected a value"),
    (["--no-such-flag"], "--no-such-flag: unknown flag"),
])
def test_bad_flag_value_names_the_flag(flags, message):
    with pytest.raises(ConfigError) as e:
        parse_train_args(BASE + flags)
    text = str(e.value)
    assert text.startswith(message), text
    assert "\n" not in text and "<root>" not in text and "Value error" not in text and "_" not in text.split(":")[0]
    assert "omnitune train --help" in text or "remove" in text or "add --save" in text


def test_missing_required_flag():
    with pytest.raises(ConfigError, match=r"^--train-iters: is required; add --train-iters N$"):
        parse_train_args(BASE[:4])


def test_good_flags_parse():
    args, ignored, dry = parse_train_args(BASE + ["--lr", "0", "--clip-grad", "0", "--adam-beta1", "0",
                                                  "--use-mcore-models", "--tokenizer-type", "X", "--dry-run"])
    assert (args.lr, args.clip_grad, args.adam_beta1, dry) == (0.0, 0.0, 0.0, True)
    assert ignored == ["tokenizer-type", "use-mcore-models"]


def test_data_json_error_names_file_and_key_without_root(tmp_path):
    from omnitune.config.data import load_data_config

    cfg = write_config(tmp_path, [], pre={"image_min_pixels": 100, "image_max_pixels": 10})
    with pytest.raises(ConfigError) as e:
        load_data_config(cfg)
    assert str(e.value) == (f"{cfg}: dataset_param.preprocess_parameters: image_min_pixels (100) must be <= "
                            f"image_max_pixels (10); see docs/reference.md")


def _plan(tmp_path, hf_dir, flags=(), data=None, model=None):
    data_json, model_json = write_configs(tmp_path, hf_dir)
    for path, change in ((data_json, data), (model_json, model)):
        if change:
            d = json.loads(path.read_text())
            change(d)
            path.write_text(json.dumps(d))
    return make_plan(["--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "1",
                      *flags, "--dry-run"])[0]


def _set(*keys_value):
    *keys, value = keys_value

    def change(d):
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    return change


def test_dry_run_accepts_the_demo_configs(tmp_path, tiny_qwen2vl):
    plan = _plan(tmp_path, tiny_qwen2vl, ["--micro-batch-size", "2", "--global-batch-size", "4"])
    assert plan.grad_acc == 2


@pytest.mark.parametrize("flags, data, model, error, match", [
    (["--micro-batch-size", "2", "--global-batch-size", "3"], None, None, ConfigError,
     r"--global-batch-size 3 must be a multiple of --micro-batch-size 2"),
    ([], _set("dataset_param", "basic_parameters", "template", "qwen3_vl"), None, ConfigError,
     r"data\.json: basic_parameters\.template 'qwen3_vl' does not fit the model family qwen2_vl .*; use 'qwen2vl'"),
    ([], _set("dataset_param", "preprocess_parameters", "use_audio_in_video", True), None, DataError,
     r"use_audio_in_video is true but template 'qwen2vl' has no audio"),
    ([], None, lambda m: [mod.update(freeze=True) for mod in (*m["image_encoder"].values(), m["text_decoder"])],
     ConfigError, r"model\.json: every module is frozen"),
    ([], None, _set("audio_encoder", "audio_encoder", "attn_implementation", "sdpa"), ConfigError,
     r"model\.json audio_encoder\.audio_encoder: this model \(qwen2_vl\) has no such module"),
])
def test_dry_run_refuses_what_the_run_refuses(tmp_path, tiny_qwen2vl, flags, data, model, error, match):
    with pytest.raises(error, match=match):
        _plan(tmp_path, tiny_qwen2vl, flags, data, model)


def test_cli_dry_run_bad_flag_is_one_line_exit_2(tmp_path, tiny_qwen2vl):
    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl)
    r = omnitune(["train", "--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "2",
                  "--weight-decay", "-1", "--dry-run"], check=False, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "omnitune: error: --weight-decay: must be >= 0.0, got -1; see omnitune train --help or docs/reference.md"]
    assert r.stdout == ""


def test_tiny_model_unknown_family_is_one_line(tmp_path, capsys):
    from omnitune.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["tiny-model", "--family", "foo", "--out", str(tmp_path / "m")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("omnitune: error: --family: invalid choice: 'foo' (choose from "
                                               "'qwen2_vl', "), err
    assert not (tmp_path / "m").exists()


def test_torchrun_config_error_is_the_last_line(tmp_path):
    """The seed scripts' `torchrun -m omnitune.train`: torchrun prints its ChildFailedError report
    when a worker exits 2; the one omnitune line comes after it, once. (The flag fails before any
    config is read: no model folder needed.)"""
    data_json, model_json = write_configs(tmp_path, tmp_path / "no_model")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get(
        "PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           "-m", "omnitune.train", "--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "2",
           "--lr", "-1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    line = "omnitune: error: --lr: must be >= 0.0, got -1; see omnitune train --help or docs/reference.md"
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1] == line, r.stderr[-3000:]
    assert r.stderr.count(line) == 1
    assert "src/omnitune/" not in r.stderr   # no worker traceback (torchrun's own shows torch frames only)


def test_inspect_decodes_what_training_decodes(tmp_path, tiny_qwen2vl):
    """A JPEG whose header reads but whose data is cut: inspect refuses it as training would."""
    from omnitune.data.tools.inspect import inspect_data

    ok, bad = jpeg(tmp_path / "ok.jpg"), jpeg(tmp_path / "bad.jpg", seed=1)
    data = (tmp_path / "bad.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(data[:len(data) // 2])
    turns = [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A box."}]
    cfg = write_config(tmp_path, [{"images": [ok], "messages": turns}, {"images": [bad], "messages": turns}],
                       pre={"model_name_or_path": str(tiny_qwen2vl)})
    with pytest.raises(DataError, match=r"d\.json: sample 1.*bad\.jpg"):
        inspect_data(str(cfg))
    report = inspect_data(str(cfg), decode=False)
    assert "decoded        : no (--no-decode)" in report
    (tmp_path / "bad.jpg").write_bytes(data)
    assert "decoded        : the media of 2 samples, as training decodes them" in inspect_data(str(cfg))


@pytest.mark.parametrize("flags, line", [
    (["--nproc-per-node", "abc"], "omnitune: error: --nproc-per-node: invalid int value: 'abc'; see omnitune train --help"),
    (["--nproc-per-node", "0"], "omnitune: error: --nproc-per-node: must be >= 1, got 0; see omnitune train --help"),
    (["--nnodes", "2", "--node-rank", "2"], "omnitune: error: --node-rank 2 must be in 0..1 (--nnodes 2)"),
])
def test_launcher_flag_errors(flags, line, capsys):
    from omnitune.cli.main import main

    try:
        rc = main(["train", *flags, *BASE])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
