"""What people look at: tokens/s precision, the progress bar, TensorBoard events, metrics.png and
summary.json, `omnitune plot`, metrics.jsonl after a resume, W&B skipped when absent, and the
demo's answer check."""
from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from omnitune.cli.main import main as cli_main
from omnitune.train.report import PLOT_POINTS_KEY, ProgressBar, sig3
from spine_util import omnitune, train_flags, write_configs


def test_tokens_per_s_has_three_significant_digits():
    assert [sig3(x) for x in (12345.0, 999.6, 9.876, 0.4321, 0.01234, 0.0)] == \
        ["12300", "1000", "9.88", "0.432", "0.0123", "0"]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_one_line_with_eta_only_on_a_terminal(capsys):
    tty = _Tty()
    bar = ProgressBar(total=4, initial=1, enabled=True, file=tty)
    bar.update(2.5, 0.25)
    bar.write("iteration line")
    bar.close()
    shown = tty.getvalue()
    assert "train 2/4" in shown and "ETA" in shown and "ETA 00:0" in shown and "0.250 tokens/s" in shown
    assert "iteration line" in capsys.readouterr().out   # printed above the bar, not into it
    assert "iteration line" not in shown.replace("\r", "\n").split("\n")[-1]

    piped = io.StringIO()   # not a terminal (a log file, a pipe): no bar at all
    bar = ProgressBar(total=4, enabled=True, file=piped)
    bar.update(2.5, 10.0)
    bar.close()
    off = ProgressBar(total=4, enabled=False, file=_Tty())  # --no-progress-bar
    off.update(2.5, 10.0)
    assert piped.getvalue() == "" and off.file.getvalue() == ""


class _FakeWandb:
    """Records what the trainer hands to the ``wandb`` module (the package is not installed here)."""

    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _iterations(save, key):
    return [r["iteration"] for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_run_writes_events_plot_summary_and_resume_keeps_each_iteration_once(tiny_qwen2vl, tmp_path, capfd,
                                                                             monkeypatch):
    from PIL import Image

    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl)
    d = json.loads(data_json.read_text())
    d["dataset_param"]["basic_parameters"]["val_rate"] = 0.2
    data_json.write_text(json.dumps(d))
    save = tmp_path / "save"
    flags = train_flags(data_json, model_json, iters=4, save=save, load=tiny_qwen2vl, mbs=2, gbs=2,
                        extra=["--save-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
                               "--seq-length", "256"])
    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)   # W&B installed and asked for
    assert cli_main(["train", *flags, "--wandb-project", "demo", "--wandb-exp-name", "run1"]) == 0
    out = capfd.readouterr().out
    assert "[summary] iterations 1..4 (4 steps)" in out and "omnitune plot" in out
    assert wandb.init_kwargs["project"] == "demo" and wandb.init_kwargs["name"] == "run1"
    assert wandb.init_kwargs["config"]["train_iters"] == 4
    assert [step for step, v in wandb.logged if "train/loss" in v] == [1, 2, 3, 4]
    assert [step for step, v in wandb.logged if "val/loss" in v] == [2, 4] and wandb.finished

    # a crash after the step-2 checkpoint: steps 3, 4 were logged, the run restarts from 2
    shutil.rmtree(save / "iter_0000004")
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    (save / "metrics.png").unlink()
    monkeypatch.setitem(sys.modules, "wandb", None)   # W&B asked for but not installed: skipped
    resumed = [f if f != str(tiny_qwen2vl) else str(save) for f in flags]
    assert cli_main(["train", *resumed, "--wandb-project", "demo"]) == 0
    out = capfd.readouterr().out
    assert "at iteration 2" in out and "dropped 3 record(s) after iteration 2" in out
    assert "wandb is not installed" in out

    # metrics.jsonl, TensorBoard and the plot: every iteration once, evaluations at 2 and 4
    assert _iterations(save, "loss") == [1, 2, 3, 4] and _iterations(save, "val_loss") == [2, 4]
    tb = save / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    for tag in ("train/loss", "train/lr", "train/tokens_per_s"):
        assert _scalars(tb, tag) == [1, 2, 3, 4], tag
    assert _scalars(tb, "val/loss") == [2, 4]
    with Image.open(save / "metrics.png") as img:
        img.verify()
    with Image.open(save / "metrics.png") as img:
        assert img.format == "PNG" and img.size[0] > 500
        points = json.loads(img.text[PLOT_POINTS_KEY])
    assert points == {"loss": 4, "validation loss": 2, "learning rate": 4, "tokens/s": 4}

    s = json.loads((save / "summary.json").read_text())
    assert (s["first_iteration"], s["last_iteration"], s["steps"]) == (3, 4, 2)
    assert s["tokens"] > 0 and s["time_s"] > 0 and s["tokens_per_s"] == pytest.approx(s["tokens"] / s["time_s"])
    assert [p["rank"] for p in s["peak_memory"]] == [0] and s["peak_memory"][0]["rss_bytes"] > 2**20

    # `omnitune plot` redraws from the save dir
    (save / "metrics.png").unlink()
    assert cli_main(["plot", str(save)]) == 0
    assert "loss: 4 points" in capfd.readouterr().out
    with Image.open(save / "metrics.png") as img:
        assert json.loads(img.text[PLOT_POINTS_KEY]) == points
    assert cli_main(["plot", str(save), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").is_file()


def test_plot_errors_name_the_folder(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path / "nope")]) == 2
    assert f"omnitune: error: {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n')
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "--out" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "x.jpg").exists()


def test_demo_check_refuses_an_untrained_model(tiny_qwen2vl, capsys):
    from omnitune.cli.demo import demo_questions, report_check

    questions = demo_questions()
    assert len(questions) == 36   # 32 images + 4 text-only questions
    # a few of them (an untrained model babbles to the token limit: the whole set is slow)
    some = [next(q for q in questions if q.expected == "A red square."),
            next(q for q in questions if q.expected == "Hello!")]
    assert report_check(tiny_qwen2vl, some) is False
    err = capsys.readouterr().err
    assert "demo FAILED: 0/2 answers correct" in err
    assert "expected 'A red square.'" in err and "expected 'Hello!'" in err


@pytest.mark.slow
def test_demo_learns_every_bundled_answer(tmp_path):
    r = omnitune(["demo", "--out", str(tmp_path / "demo")], timeout=900)
    assert "demo OK: 36/36 answers correct" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "demo" / "save_dir" / "metrics.png").is_file()
