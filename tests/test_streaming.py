"""Streaming data (streaming: true): lazy JSON / JSONL reading, shards disjoint across ranks and
DataLoader workers, exact resume of the position (in process and through the trainer, 2 ranks),
and DataLoader workers for map-style data giving the same losses as none."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import omnitune.data.streaming as streaming
from omnitune.config.data import load_data_config, unsupported_features
from omnitune.data import Collator, DataError, StreamingSFTDataset, build_train_dataset
from spine_util import REPO, losses, omnitune, train_flags, write_configs

ATTR = {"images": "images", "messages": "messages", "role_tag": "role", "content_tag": "content",
        "user_tag": "user", "assistant_tag": "assistant"}


def sample(i: int, image: str | None = None) -> dict:
    s = {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Answer {i}."}]}
    if image:
        s["images"], s["messages"][0]["content"] = [image], "<image>" + s["messages"][0]["content"]
    return s


def make_stream_data(tmp: Path, n_json=7, n_jsonl=6, basic=None) -> Path:
    """Two files (a JSON array and a JSONL file, with blank lines) holding samples 0..n-1, some with
    an image; returns data.json (streaming: true)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(tmp / "img.jpg")
    recs = [sample(i, "img.jpg" if i % 3 == 0 else None) for i in range(n_json + n_jsonl)]
    (tmp / "a.json").write_text(json.dumps(recs[:n_json], indent=1))
    (tmp / "b.jsonl").write_text("\n\n".join(json.dumps(r) for r in recs[n_json:]) + "\n")
    cfg = {"dataset_param": {
        "preprocess_parameters": {"image_min_pixels": 56 * 56, "image_max_pixels": 28 * 28 * 16},
        "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(tmp), "dataset": "a.json,b.jsonl",
                             "streaming": True, **(basic or {})},
        "attr": ATTR}}
    (tmp / "data.json").write_text(json.dumps(cfg))
    return tmp / "data.json"


def answers(processor, batch) -> list[int]:
    """The sample numbers of a collated batch (from the 'Answer i.' text)."""
    out = []
    for row in batch["input_ids"]:
        text = processor.tokenizer.decode(row)
        out += [int(m) for m in re.findall(r"Answer (\d+)\.", text)]
    assert len(out) == len(batch["input_ids"])
    return out


def stream(data_json, processor, *, mbs=2, rank=0, size=1, workers=0, state=None, shuffle=False):
    ds = StreamingSFTDataset(load_data_config(data_json), processor, 2048, micro_batch_size=mbs,
                             collate_fn=Collator(processor.tokenizer.pad_token_id), dp_rank=rank, dp_size=size,
                             num_workers=workers, shuffle=shuffle, seed=7)
    if state is not None:
        ds.load_state_dict(state)
    return ds


def take(ds, n: int, workers: int):
    """n consumed batches: (sample numbers of each, the dataset's state after them)."""
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    it, out = iter(loader), []
    for _ in range(n):
        b = next(it)
        ds.advance(b.pop("stream_state"))
        out.append(b)
    del it
    return out


def test_lazy_reader_json_array_and_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "_CHUNK", 5)  # records span many reads
    recs = [{"i": i, "s": "]}{,\"" * (i % 4), "nested": [{"a": [i]}]} for i in range(30)]
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "c.jsonl").write_text("\n\n".join(json.dumps(r) for r in recs))  # blank lines, no final newline
    for name in ("a.json", "b.jsonl", "c.jsonl"):
        p = tmp_path / name
        assert [(i, streaming.parse_record(p, r)) for i, r in streaming.iter_raw_records(p)] == list(enumerate(recs))
    (tmp_path / "t.json").write_text(json.dumps(recs)[:-20])
    with pytest.raises(DataError, match=r"t\.json: sample 29 is not valid JSON"):
        list(streaming.iter_raw_records(tmp_path / "t.json"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        [streaming.parse_record(tmp_path / "bad.jsonl", r) for _, r in streaming.iter_raw_records(tmp_path / "bad.jsonl")]


def test_streamed_items_equal_the_map_style_dataset(tmp_path, processor):
    data_json = make_stream_data(tmp_path)
    cfg = load_data_config(data_json)
    cfg.dataset_param.basic_parameters.streaming = False
    ds = build_train_dataset(cfg, processor, 2048)
    collate = Collator(processor.tokenizer.pad_token_id)
    got = take(stream(data_json, processor, mbs=3), 4, 0)
    want = [collate([ds[(3 * b + k) % len(ds)] for k in range(3)]) for b in range(4)]  # 13 samples: wraps
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            assert torch.equal(g[k], w[k]) if torch.is_tensor(w[k]) else g[k] == w[k], k


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_shards_disjoint_cover_and_workers_keep_the_order(tmp_path, processor, workers):
    data_json = make_stream_data(tmp_path)  # 13 samples
    seen = {}
    for rank in range(2):
        batches = take(stream(data_json, processor, mbs=2, rank=rank, size=2, workers=workers), 3, workers)
        seen[rank] = [a for b in batches for a in answers(processor, b)]
    assert seen[0] == [0, 2, 4, 6, 8, 10]      # record k goes to rank k % 2, in order, whatever the workers
    assert seen[1] == [1, 3, 5, 7, 9, 11]


def test_resume_continues_with_the_next_unseen_batch(tmp_path, processor):
    data_json = make_stream_data(tmp_path)
    for workers in (0, 2):
        full = take(stream(data_json, processor, mbs=2, workers=workers), 12, workers)  # 24 items: 2 epochs
        ds = stream(data_json, processor, mbs=2, workers=workers)
        take(ds, 5, workers)  # an odd count: the next batch is worker 1's turn
        state = json.loads(json.dumps(ds.state_dict()))
        resumed = take(stream(data_json, processor, mbs=2, workers=workers, state=state), 7, workers)
        assert [answers(processor, b) for b in resumed] == [answers(processor, b) for b in full[5:]]
        for a, b in zip(resumed, full[5:]):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert [answers(processor, b) for b in full[5:8]] == [[10, 11], [12, 0], [1, 2]]
    with pytest.raises(DataError, match=r"saved with .*'num_workers': 2.* this run has .*'num_workers': 1"):
        stream(data_json, processor, mbs=2, workers=0, state=state)


def test_shuffle_windows_differ_per_pass_and_resume_exactly(tmp_path, processor, monkeypatch):
    monkeypatch.setattr(streaming, "SHUFFLE_WINDOW", 4)  # 13 items per pass: windows 0-3, 4-7, 8-11, 12
    data_json = make_stream_data(tmp_path)
    orders = {}
    for workers in (0, 2):
        full = [a for b in take(stream(data_json, processor, mbs=1, workers=workers, shuffle=True), 26, workers)
                for a in answers(processor, b)]
        orders[workers] = full
        ds = stream(data_json, processor, mbs=1, workers=workers, shuffle=True)
        take(ds, 9, workers)
        resumed = take(stream(data_json, processor, mbs=1, workers=workers, shuffle=True, state=ds.state_dict()),
                       11, workers)
        assert [a for b in resumed for a in answers(processor, b)] == full[9:20]
    assert orders[0] == orders[2]
    first, second = orders[0][:13], orders[0][13:]
    for order in (first, second):
        for lo in (0, 4, 8, 12):  # a permutation inside each window
            assert sorted(order[lo:lo + 4]) == list(range(lo, min(lo + 4, 13)))
    assert first != list(range(13)) and second != first
    with pytest.raises(DataError, match=r"saved with .*'shuffle': True.* this run has .*'shuffle': False"):
        stream(data_json, processor, mbs=1, workers=2, shuffle=False, state=ds.state_dict())


def test_dropped_samples_are_replaced_and_no_usable_sample_is_an_error(tmp_path, processor):
    data_json = make_stream_data(tmp_path, basic={"cutoff_len": 30})  # image samples are too long: dropped
    # a worker fills its batch from its own next block: worker 0 has items 0,1 | 4,5 ..., worker 1 2,3 | 6,7 ...
    for workers, want in ((0, [[1, 2], [4, 5], [7, 8], [10, 11]]), (2, [[1, 4], [2, 7], [5, 8], [10, 11]])):
        got = [answers(processor, b) for b in take(stream(data_json, processor, mbs=2, workers=workers), 4, workers)]
        assert got == want, workers
    tiny = make_stream_data(tmp_path, n_json=1, n_jsonl=2, basic={"cutoff_len": None})
    ds = stream(tiny, processor, mbs=2, workers=2)  # fewer items than mbs x workers: blocks wrap passes
    assert [answers(processor, b) for b in take(ds, 3, 2)] == [[0, 1], [2, 0], [1, 2]]
    tiny = make_stream_data(tmp_path, n_json=1, n_jsonl=1, basic={"cutoff_len": 30})  # 0 is always dropped
    ds = stream(tiny, processor, mbs=1, workers=2)  # worker 0 only ever sees sample 0: an error, not a hang
    with pytest.raises(DataError, match=r"worker 0 of 2\) got no usable sample in a whole pass"):
        take(ds, 2, 2)
    ds = stream(tiny, processor, mbs=1, workers=2, shuffle=True)  # shuffled: worker 0 gets sample 1 at times
    assert sorted(a for b in take(ds, 8, 2) for a in answers(processor, b)) == [1] * 8
    nothing = make_stream_data(tmp_path, n_json=1, n_jsonl=1, basic={"cutoff_len": 5})  # every sample dropped
    with pytest.raises(DataError, match=r"got no usable sample in a whole pass"):
        take(stream(nothing, processor, mbs=1, workers=0, shuffle=True), 1, 0)


def test_config_accepts_streaming_but_not_with_val_rate(tmp_path):
    data_json = make_stream_data(tmp_path)
    assert unsupported_features(load_data_config(data_json)) == []
    data_json = make_stream_data(tmp_path, basic={"val_rate": 0.2})
    assert any("val_rate cannot split a streamed dataset" in p for p in unsupported_features(load_data_config(data_json)))


def test_bad_record_in_a_worker_reaches_the_trainer_as_a_clean_error(tmp_path, processor):
    from types import SimpleNamespace

    from omnitune.train.trainer import Trainer

    data_json = make_stream_data(tmp_path)
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n')
    ds = stream(data_json, processor, mbs=2, workers=1)
    it = iter(DataLoader(ds, batch_size=None, num_workers=1))
    trainer = SimpleNamespace(dataset=ds)
    for _ in range(3):  # samples 0..5 are fine
        Trainer._next_micro_batch(trainer, it)
    with pytest.raises(DataError) as e:
        for _ in range(10):
            Trainer._next_micro_batch(trainer, it)
    msg = str(e.value)
    assert re.fullmatch(r".*b\.jsonl: sample 6: turn 1 has unknown role 'bot'.*", msg) and "Traceback" not in msg, msg


def test_streaming_validation_comes_from_val_dataset(tmp_path, processor):
    data_json = make_stream_data(tmp_path, basic={"val_dataset": "a.json", "val_max_samples": 3})
    from omnitune.data import build_streaming_datasets
    train, val = build_streaming_datasets(load_data_config(data_json), processor, 2048, micro_batch_size=2,
                                          collate_fn=Collator(processor.tokenizer.pad_token_id), dp_rank=0,
                                          dp_size=1, num_workers=0)
    assert isinstance(train, StreamingSFTDataset) and len(val) == 3
    assert [answers(processor, {"input_ids": val[i]["input_ids"][None]}) for i in range(3)] == [[0], [1], [2]]


_SHARDS = textwrap.dedent("""
    import json, os, re, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from transformers import AutoProcessor
    from omnitune.config.data import load_data_config
    from omnitune.data import Collator, StreamingSFTDataset
    data_json, proc_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    processor = AutoProcessor.from_pretrained(proc_dir)
    ds = StreamingSFTDataset(load_data_config(data_json), processor, 2048, micro_batch_size=1,
                             collate_fn=Collator(processor.tokenizer.pad_token_id), dp_rank=rank, dp_size=size,
                             num_workers=2)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    mine = []
    for _ in range(7):
        b = next(it)
        mine += [int(x) for x in re.findall(r"Answer (\\d+)\\.", processor.tokenizer.decode(b["input_ids"][0]))]
    got = [None] * size
    dist.all_gather_object(got, mine)
    if rank == 0:
        open(out, "w").write(json.dumps(got))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_get_disjoint_shards_covering_the_data(tmp_path, tiny_qwen2vl):
    data_json = make_stream_data(tmp_path)  # 13 samples: rank 0 gets 7, rank 1 gets 6 per pass
    script = tmp_path / "shards.py"
    script.write_text(_SHARDS)
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        str(script), str(data_json), str(tiny_qwen2vl), str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert r0 == [0, 2, 4, 6, 8, 10, 12] and r1[:6] == [1, 3, 5, 7, 9, 11] and r1[6] == 1  # rank 1 wraps
    assert set(r0).isdisjoint(r1[:6]) and set(r0) | set(r1) == set(range(13))


def _streaming_configs(tmp: Path, hf_dir: Path, max_samples: int, workers: int) -> tuple[Path, Path]:
    data_json, model_json = write_configs(tmp, hf_dir)
    raw = json.loads(data_json.read_text())
    raw["dataset_param"]["basic_parameters"].update(streaming=True, max_samples=max_samples, cache_dir=None)
    raw["dataloader_param"]["num_workers"] = workers
    data_json.write_text(json.dumps(raw, indent=2))
    return data_json, model_json


@pytest.mark.slow
def test_streaming_training_resumes_exactly_on_two_ranks(tiny_qwen2vl, tmp_path):
    """2 ranks, 2 DataLoader workers each, grad-acc 2, 10 samples (5 per rank per pass): 6 iterations
    cross passes. Resuming from the iteration-3 checkpoint gives iterations 4-6 of the uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = _streaming_configs(tmp_path / "c2", tiny_qwen2vl, 10, 2)
    omnitune(["train", "--nproc-per-node", "2", *train_flags(*cfg, iters=6, save=straight, load=tiny_qwen2vl,
                                                             extra=["--save-interval", "3"])])
    pos = [json.loads((straight / "iter_0000003" / "data" / f"rank_{r:05d}.json").read_text()) for r in range(2)]
    # 3 iterations x 2 micro-batches of 1 = items 0..5 of each rank: worker 0 read items 0, 2, 4 and
    # worker 1 items 1, 3, 5 (the pass has 5 items per rank, so item 5 is the first of pass 2)
    assert [p["batches"] for p in pos] == [6, 6]
    assert [p["workers"] for p in pos] == [[5, 6], [5, 6]]
    # the state a run stopped after iteration 3 leaves behind
    resumed.mkdir()
    shutil.copytree(straight / "iter_0000003", resumed / "iter_0000003")
    (resumed / "latest_checkpointed_iteration.txt").write_text("3")
    omnitune(["train", "--nproc-per-node", "2", *train_flags(*cfg, iters=6, save=resumed, load=resumed,
                                                             extra=["--save-interval", "3"])])
    ref, got = losses(straight), losses(resumed)
    assert sorted(ref) == list(range(1, 7)) and sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        assert got[it] == ref[it], (it, got[it], ref[it])
    assert len(set(ref.values())) == 6


@pytest.mark.slow
def test_map_style_dataloader_workers_give_the_same_losses(tiny_qwen2vl, tmp_path, monkeypatch):
    """The trainer in this process (a one-rank gloo group): 4 iterations with DataLoader num_workers 0
    and 2 give identical losses."""
    from omnitune.parallel.mesh import _free_port, init_distributed, shutdown
    from omnitune.train.trainer import Trainer, make_plan

    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    d = init_distributed()
    runs = {}
    try:
        for workers in (0, 2):
            plan, _ = make_plan(train_flags(data_json, model_json, iters=4, save=tmp_path / f"w{workers}",
                                            load=tiny_qwen2vl, extra=["--num-workers", str(workers)]))
            trainer = Trainer(plan, d)
            assert trainer.num_workers == workers
            runs[workers] = trainer.fit()
    finally:
        shutdown()
    assert len(runs[0]) == 4 and runs[0][-1] < runs[0][0]
    assert runs[0] == runs[2]
