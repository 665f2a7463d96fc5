"""Preprocessing cache (cache_dir / overwrite_cache) and the build worker pool
(preprocessing_num_workers): reuse without re-encoding, invalidation by every kind of input change,
two processes starting at once, and N workers == 1 worker."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from media_util import jpeg, mp4

from omnitune.config.data import load_data_config
from omnitune.data import build_train_dataset
from omnitune.data import templates as templates_mod
from omnitune.data.dataset import SFTDataset

REPO = Path(__file__).resolve().parents[1]
ATTR = {"images": "images", "videos": "videos", "messages": "messages", "role_tag": "role", "content_tag": "content",
        "user_tag": "user", "assistant_tag": "assistant"}


def make_data(tmp: Path, n: int = 6, *, basic=None, pre=None) -> Path:
    """n samples (every other one with an image, sample 1 with a video) in d.jsonl + data.json with a
    cache_dir; returns data.json."""
    samples = []
    for i in range(n):
        s = {"messages": [{"role": "user", "content": f"Question {i}: what is shown?" + " more" * i},
                          {"role": "assistant", "content": f"Answer {i}."}]}
        if i % 2 == 0:
            s["images"] = [jpeg(tmp / f"img{i}.jpg", (60 + 8 * i, 56), seed=i)]
            s["messages"][0]["content"] = "<image>" + s["messages"][0]["content"]
        elif i == 1:
            s["videos"] = [mp4(tmp / "vid1.mp4", n_frames=8, fps=4)]
            s["messages"][0]["content"] = "<video>" + s["messages"][0]["content"]
        samples.append(s)
    (tmp / "d.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    cfg = {"dataset_param": {
        "preprocess_parameters": {"image_min_pixels": 56 * 56, "image_max_pixels": 28 * 28 * 64,
                                  "video_min_pixels": 28 * 28, "video_max_pixels": 56 * 84, **(pre or {})},
        "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(tmp), "dataset": "d.jsonl",
                             "cache_dir": str(tmp / "cache"), **(basic or {})},
        "attr": ATTR}}
    (tmp / "data.json").write_text(json.dumps(cfg))
    return tmp / "data.json"


def edit_config(data_json: Path, section: str, **values) -> None:
    raw = json.loads(data_json.read_text())
    raw["dataset_param"][section].update(values)
    data_json.write_text(json.dumps(raw))


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts SFTDataset.encode_samples calls (the tokenize + size step) in this process."""
    calls = []
    real = SFTDataset.encode_samples

    def counting(self, samples):
        calls.append(len(samples))
        return real(self, samples)

    monkeypatch.setattr(SFTDataset, "encode_samples", counting)
    return calls


def build(data_json: Path, processor, seq=2048):
    return build_train_dataset(load_data_config(data_json), processor, seq)


def assert_same(a: SFTDataset, b: SFTDataset) -> None:
    assert len(a) == len(b) and a.media == b.media
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert (a.num_truncated, a.num_dropped_media, a.num_dropped_untrained) == \
        (b.num_truncated, b.num_dropped_media, b.num_dropped_untrained)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


def test_second_build_reuses_cache_without_encoding(tmp_path, processor, encode_calls):
    data_json = make_data(tmp_path)
    first = build(data_json, processor)
    assert sum(encode_calls) == 6
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    encode_calls.clear()
    second = build(data_json, processor)
    assert encode_calls == []  # nothing re-tokenized or re-sized
    assert isinstance(second.input_ids, np.memmap)
    assert_same(first, second)
    # settings that cannot change the result keep the entry
    edit_config(data_json, "basic_parameters", preprocessing_num_workers=2, preprocessing_batch_size=3, val_rate=0.5)
    build(data_json, processor)
    assert encode_calls == []
    # and the cached data equal a build without any cache
    edit_config(data_json, "basic_parameters", cache_dir=None, preprocessing_num_workers=None)
    assert_same(build(data_json, processor), second)
    assert sum(encode_calls) == 6


def _change_dataset(tmp, data_json, processor):
    f = tmp / "d.jsonl"
    f.write_text(f.read_text().replace("Answer 3.", "Answer 9."))  # same size
    return processor, 2048


def _change_media(tmp, data_json, processor):
    jpeg(tmp / "img2.jpg", (200, 120), seed=99)  # new size -> new grid
    return processor, 2048


def _change_processor_file(tmp, data_json, processor):
    from transformers import AutoProcessor
    src = Path(processor.tokenizer.name_or_path)
    copy = tmp / "proc"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((copy / "processor_config.json").read_text())
    cfg["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    (copy / "processor_config.json").write_text(json.dumps(cfg))
    return AutoProcessor.from_pretrained(copy), 2048


def _change_tokenizer(tmp, data_json, processor):
    from transformers import AutoProcessor
    p = AutoProcessor.from_pretrained(processor.tokenizer.name_or_path)
    p.tokenizer.add_tokens(["<new_token>"])
    return p, 2048


def _change_template(tmp, data_json, processor, monkeypatch=None):
    return processor, 2048  # the monkeypatch happens in the test (needs its fixture)


def _change_setting(section, **values):
    def f(tmp, data_json, processor):
        edit_config(data_json, section, **values)
        return processor, 2048
    return f


def _change_seq_length(tmp, data_json, processor):
    return processor, 40


CHANGES = {
    "dataset_file_content": _change_dataset,
    "media_file": _change_media,
    "processor_file": _change_processor_file,
    "tokenizer": _change_tokenizer,
    "template": _change_template,
    "train_on_prompt": _change_setting("basic_parameters", train_on_prompt=True),
    "cutoff_len": _change_setting("basic_parameters", cutoff_len=60),
    "max_samples": _change_setting("basic_parameters", max_samples=4),
    "image_max_pixels": _change_setting("preprocess_parameters", image_max_pixels=28 * 28 * 4),
    "seq_length": _change_seq_length,
    "overwrite_cache": _change_setting("basic_parameters", overwrite_cache=True),
    "transformers_version": _change_template,  # (monkeypatched in the test, as the template)
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_input_change_invalidates(tmp_path, processor, encode_calls, monkeypatch, change):
    data_json = make_data(tmp_path)
    build(data_json, processor)
    assert sum(encode_calls) == 6
    encode_calls.clear()
    if change == "template":
        t = templates_mod.TEMPLATES["qwen2vl"]
        monkeypatch.setitem(templates_mod.TEMPLATES, "qwen2vl", dataclasses.replace(t, default_system="Be brief."))
    if change == "transformers_version":  # an upgrade may change tokenization or image grids
        import transformers
        monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post1")
    proc, seq = CHANGES[change](tmp_path, data_json, processor)
    rebuilt = build(data_json, proc, seq)
    assert sum(encode_calls) > 0, "the change was not noticed: the stale entry was reused"
    # the rebuilt data are what a build without cache gives for the changed inputs
    edit_config(data_json, "basic_parameters", cache_dir=None, overwrite_cache=False)
    assert_same(rebuilt, build(data_json, proc, seq))
    if change != "overwrite_cache":
        # and the new entry is reused in turn
        edit_config(data_json, "basic_parameters", cache_dir=str(tmp_path / "cache"))
        encode_calls.clear()
        build(data_json, proc, seq)
        assert encode_calls == []


def test_truncated_entry_is_rebuilt(tmp_path, processor, encode_calls):
    data_json = make_data(tmp_path)
    first = build(data_json, processor)
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    (entry / "labels.npy").write_bytes(b"garbage")
    encode_calls.clear()
    assert_same(build(data_json, processor), first)
    assert sum(encode_calls) == 6


def test_workers_give_the_same_result(tmp_path, processor, encode_calls):
    data_json = make_data(tmp_path, n=12, basic={"cache_dir": None, "preprocessing_batch_size": 5})
    one = build(data_json, processor)
    edit_config(data_json, "basic_parameters", preprocessing_num_workers=3)
    encode_calls.clear()
    three = build(data_json, processor)
    assert encode_calls == []  # the encoding ran in the worker processes, not here
    assert_same(one, three)


def test_worker_error_names_the_sample(tmp_path, processor):
    data_json = make_data(tmp_path, n=8, basic={"cache_dir": None, "preprocessing_num_workers": 2})
    (tmp_path / "img6.jpg").unlink()
    from omnitune.data import DataError
    with pytest.raises(DataError, match=r"d\.jsonl: sample 6: image file not found"):
        build(data_json, processor)


_RACER = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from transformers import AutoProcessor
    from omnitune.config.data import load_data_config
    from omnitune.data import build_train_dataset
    from omnitune.data.dataset import SFTDataset
    data_json, proc_dir, go, me = sys.argv[1:5]
    processor = AutoProcessor.from_pretrained(proc_dir)
    calls = []
    real = SFTDataset.encode_samples
    def slow(self, samples):  # a slow build, so the other process arrives while it runs
        calls.append(len(samples)); time.sleep(1.5); return real(self, samples)
    SFTDataset.encode_samples = slow
    cfg = load_data_config(data_json)
    Path(me + ".ready").write_text("")
    while not Path(go).exists():
        time.sleep(0.01)
    ds = build_train_dataset(cfg, processor, 2048)
    Path(me).write_text(json.dumps({"calls": sum(calls), "ids": ds.input_ids.tolist(), "media": repr(ds.media)}))
""")


def _race(tmp_path: Path, data_json: Path, proc_dir: Path, tag: str) -> list[dict]:
    """Start two processes building ``data_json`` at the same moment; return what each saw."""
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    go = tmp_path / f"go_{tag}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    outs = [tmp_path / f"out_{tag}{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(data_json), str(proc_dir), str(go), str(o)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for o in outs]
    deadline = time.time() + 120
    while not all(Path(str(o) + ".ready").exists() for o in outs):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.write_text("")
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
def test_two_processes_starting_at_once_build_once(tmp_path, processor, tiny_qwen2vl):
    data_json = make_data(tmp_path)
    results = _race(tmp_path, data_json, tiny_qwen2vl, "a")
    assert sorted(r["calls"] for r in results) == [0, 6]  # one built, the other waited and loaded
    assert results[0]["ids"] == results[1]["ids"] and results[0]["media"] == results[1]["media"]
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([n for n in left if not n.endswith(".lock")]) == 1, left  # no temp folder left behind
    loaded = build(data_json, processor)  # the entry on disk is what the racing processes built
    assert loaded.input_ids.tolist() == results[0]["ids"] and repr(loaded.media) == results[0]["media"]
    # overwrite_cache with ranks starting together: rebuilt once, not once per rank
    edit_config(data_json, "basic_parameters", overwrite_cache=True)
    results = _race(tmp_path, data_json, tiny_qwen2vl, "b")
    assert sorted(r["calls"] for r in results) == [0, 6]
    assert results[0]["ids"] == results[1]["ids"]
