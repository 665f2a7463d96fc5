"""Data pipeline: ids / pixels / grids equal the HF processor's, label masking, collator, sampler,
data.json validation, multi-dataset reading, the length limit, the bundled demo data, and the
bad-input corpus (each case: an error naming the file and the sample index)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from omnitune.config.data import load_data_config, unsupported_features
from omnitune.config.errors import ConfigError
from omnitune.data import Collator, DataError, MicroBatchSampler, build_train_dataset, demo_data_dir

REPO = Path(__file__).resolve().parents[1]
IMAGE_PAD, VSTART, VEND = 151655, 151652, 151653
MLLM_ATTR = {"images": "images", "messages": "messages", "role_tag": "role", "content_tag": "content",
             "user_tag": "user", "assistant_tag": "assistant"}
PIXELS = {"image_min_pixels": 56 * 56, "image_max_pixels": 28 * 28 * 1280}


def jpeg(path: Path, size=(80, 64), seed=0) -> str:
    """Write a random-noise JPEG of size (width, height); return its file name."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.name


def write_config(tmp: Path, samples, *, name="d.json", basic=None, attr=None, top=None) -> Path:
    """Write ``samples`` (a JSON array, or JSONL when name ends in .jsonl; str items verbatim) and a
    data.json reading them from ``tmp``; return the data.json path."""
    f = tmp / name
    if name.endswith(".jsonl"):
        f.write_text("\n".join(s if isinstance(s, str) else json.dumps(s) for s in samples) + "\n")
    else:
        f.write_text(json.dumps(samples))
    cfg = {"dataset_param": {"preprocess_parameters": dict(PIXELS),
                             "basic_parameters": {"template": "qwen2vl", "dataset_dir": str(tmp), "dataset": name,
                                                  **(basic or {})},
                             "attr": MLLM_ATTR if attr is None else attr},
           **(top or {})}
    out = tmp / "data.json"
    out.write_text(json.dumps(cfg))
    return out


def build(tmp, samples, processor, seq=2048, **kw):
    return build_train_dataset(load_data_config(write_config(tmp, samples, **kw)), processor, seq)


def hf_reference(processor, messages, image_files):
    """What the HF chat template + processor produce for the same conversation."""
    hf_msgs = []
    for m in messages:
        if m["role"] == "user":
            first, *rest = m["content"].split("<image>")
            content = [{"type": "text", "text": first}] if first else []
            for text in rest:
                content.append({"type": "image"})
                if text:
                    content.append({"type": "text", "text": text})
        else:
            content = [{"type": "text", "text": m["content"]}]
        hf_msgs.append({"role": m["role"], "content": content})
    text = processor.apply_chat_template(hf_msgs, tokenize=False)
    images = [Image.open(p).convert("RGB") for p in image_files] or None
    return processor(text=[text], images=images, return_tensors="pt",
                     images_kwargs={"size": {"shortest_edge": PIXELS["image_min_pixels"],
                                             "longest_edge": PIXELS["image_max_pixels"]}})


def _turns(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


PARITY_CASES = {
    "one_image": (_turns("<image>What is in the picture?", "Noise, mostly."), ["a"]),
    "two_images_multi_turn_system": (
        [{"role": "system", "content": "You answer briefly."},
         *_turns("Compare <image> and <image>, please.", "The second is wider.", "Sure?", "Yes.")], ["a", "b"]),
    "text_only": (_turns("Say hi.", "Hi!"), []),
    "answer_starts_with_newline": (_turns("<image>\nList two things:\n", "\n- noise\n- more noise \n"), ["b"]),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_ids_pixels_grids_equal_hf_processor(tmp_path, processor, case):
    msgs, names = PARITY_CASES[case]
    files = {"a": jpeg(tmp_path / "a.jpg", (80, 64), 1), "b": jpeg(tmp_path / "b.jpg", (150, 100), 2)}
    images = [files[n] for n in names]
    item = build(tmp_path, [{"messages": msgs, **({"images": images} if images else {})}], processor)[0]
    ref = hf_reference(processor, msgs, [tmp_path / x for x in images])
    assert item["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert item["mm_token_type_ids"].tolist() == ref["mm_token_type_ids"][0].tolist()
    assert item["attention_mask"].tolist() == ref["attention_mask"][0].tolist()
    assert item["input_ids"].dtype == torch.long and item["mm_token_type_ids"].dtype == torch.int32
    if images:
        assert torch.equal(item["image_grid_thw"], ref["image_grid_thw"])
        assert torch.equal(item["pixel_values"], ref["pixel_values"])
        assert int((item["input_ids"] == IMAGE_PAD).sum()) == int(ref["image_grid_thw"].prod(-1).sum()) // 4
    else:
        assert "pixel_values" not in item and "image_grid_thw" not in item


def test_image_min_pixels_zero_as_in_mindspeed_examples(tmp_path, processor):
    thin = jpeg(tmp_path / "thin.jpg", (80, 10))  # a side rounds to 0 patches without a minimum
    pixels = {"image_min_pixels": 0, "image_max_pixels": 262144}
    cfg = write_config(tmp_path, [{"images": [thin], "messages": _turns("<image>q", "a")}])
    raw = json.loads(cfg.read_text())
    raw["dataset_param"]["preprocess_parameters"] = pixels
    cfg.write_text(json.dumps(raw))
    item = build_train_dataset(load_data_config(cfg), processor, 2048)[0]
    assert item["image_grid_thw"].tolist() == [[1, 2, 2]]  # smart_resize with min 1: 28x28
    assert int((item["input_ids"] == IMAGE_PAD).sum()) == 1 and len(item["pixel_values"]) == 4


def test_images_without_tags_are_prepended_like_hf_images_first(tmp_path, processor):
    a, b = jpeg(tmp_path / "a.jpg", seed=1), jpeg(tmp_path / "b.jpg", seed=2)
    msgs = _turns("What differs?", "Colors.")
    item = build(tmp_path, [{"images": [a, b], "messages": msgs}], processor)[0]
    ref = hf_reference(processor, _turns("<image><image>What differs?", "Colors."), [tmp_path / a, tmp_path / b])
    assert item["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(item["pixel_values"], ref["pixel_values"])


def _trained_texts(tokenizer, item):
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for tok_id, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if label != -100:
            assert label == tok_id
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    return [tokenizer.decode(r) for r in runs + ([cur] if cur else [])]


def test_label_masking_train_on_prompt_and_mask_history(tmp_path, processor):
    tok = processor.tokenizer
    msgs = _turns("One?", "First answer.", "Two?", "Second answer.")
    item = build(tmp_path, [{"messages": msgs}], processor)[0]
    assert _trained_texts(tok, item) == ["First answer.<|im_end|>\n", "Second answer.<|im_end|>\n"]

    item = build(tmp_path, [{"messages": msgs}], processor, basic={"mask_history": True})[0]
    assert _trained_texts(tok, item) == ["Second answer.<|im_end|>\n"]

    item = build(tmp_path, [{"messages": msgs}], processor, basic={"train_on_prompt": True})[0]
    assert torch.equal(item["labels"], item["input_ids"])

    item = build(tmp_path, [{"messages": msgs}], processor, basic={"train_on_prompt": True, "mask_history": True})[0]
    text = tok.decode(item["input_ids"])
    first_answer = text.index("First answer.")
    assert _trained_texts(tok, item) == [text[:first_answer], text[first_answer + len("First answer.<|im_end|>\n"):]]


def test_image_tokens_are_never_trained(tmp_path, processor):
    a = jpeg(tmp_path / "a.jpg")
    item = build(tmp_path, [{"images": [a], "messages": _turns("<image>Describe.", "Noise.")}], processor)[0]
    image_positions = item["mm_token_type_ids"].bool()
    assert image_positions.any() and (item["labels"][image_positions] == -100).all()


def test_sharegpt_is_the_attr_default_and_system_column(tmp_path, processor):
    sample = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
              "sys": "Be terse."}
    ds = build(tmp_path, [sample], processor, attr={"system": "sys"})
    assert processor.tokenizer.decode(ds[0]["input_ids"]) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n")
    with pytest.raises(DataError, match=r"d\.json: sample 0: the conversation 'conversations' is missing "
                                        r"\(attr\.messages is 'conversations'; keys here: \['messages'\]\)"):
        build(tmp_path, [{"messages": _turns("q", "a")}], processor, attr={})


def test_multi_dataset_max_samples_dataset_dir_jsonl_and_media_paths(tmp_path, processor, monkeypatch):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    jpeg(data / "imgs" / "in_dataset_dir.jpg", seed=1)
    jpeg(tmp_path / "in_cwd.jpg", seed=2)
    one = [{"messages": _turns(f"q{i}", f"a{i}")} for i in range(5)]
    two = [{"images": ["imgs/in_dataset_dir.jpg" if i % 2 else "in_cwd.jpg"],
            "messages": _turns(f"<image>q{i}", f"a{i}")} for i in range(4)]
    (data / "one.json").write_text(json.dumps(one))
    (data / "two.data").write_text("\n".join(json.dumps(x) for x in two))  # JSONL whatever the suffix
    monkeypatch.chdir(tmp_path)
    cfg = {"dataset_param": {"preprocess_parameters": PIXELS,
                             "basic_parameters": {"dataset_dir": "data", "dataset": "data/one.json,two.data",
                                                  "max_samples": 3},
                             "attr": MLLM_ATTR}}
    (tmp_path / "data.json").write_text(json.dumps(cfg))
    ds = build_train_dataset(load_data_config(tmp_path / "data.json"), processor, 2048)
    assert len(ds) == 6  # 3 per file
    assert [m.where.rsplit(": ", 1)[1] for m in ds.media] == ["sample 0", "sample 1", "sample 2"] * 2
    paths = [p for m in ds.media for p in m.images]
    in_cwd, in_dataset_dir = str(tmp_path / "in_cwd.jpg"), str(data / "imgs" / "in_dataset_dir.jpg")
    assert paths == [in_cwd, in_dataset_dir, in_cwd]
    assert [("pixel_values" in ds[i]) for i in range(6)] == [False] * 3 + [True] * 3
    # the MindSpeed-MM guide's form: dataset_dir=/abs/folder, dataset=./data/<file in that folder>
    cfg["dataset_param"]["basic_parameters"].update(dataset_dir=str(data), dataset="./elsewhere/one.json")
    (tmp_path / "data.json").write_text(json.dumps(cfg))
    assert len(build_train_dataset(load_data_config(tmp_path / "data.json"), processor, 2048)) == 3


def test_length_limit_truncates_text_drops_media_cuts_and_logs(tmp_path, processor, caplog):
    a = jpeg(tmp_path / "a.jpg", (112, 112))
    long_text = " ".join(["word"] * 200)
    samples = [
        {"messages": _turns("Tell me.", long_text)},                                  # truncated
        {"images": [a], "messages": _turns(long_text + " <image>", "ok")},            # media cut: dropped
        {"messages": _turns(long_text, "answer")},                                    # no trained token left
        {"messages": _turns("short", "fine")},
    ]
    with caplog.at_level(logging.WARNING, logger="omnitune.data"):
        ds = build(tmp_path, samples, processor, seq=100)
    assert (len(ds), ds.num_truncated, ds.num_dropped_media, ds.num_dropped_untrained) == (2, 1, 1, 1)
    assert [len(ds[i]["input_ids"]) for i in range(2)][0] == 100
    assert "2 samples; 1 truncated to 100 tokens, 2 dropped" in caplog.text
    ds = build(tmp_path, samples, processor, seq=2048, basic={"cutoff_len": 100})  # the smaller limit wins
    assert ds.max_length == 100 and len(ds) == 2
    with pytest.raises(DataError, match=r"no usable sample out of 1: 1 would have media cut at the length limit 20"):
        build(tmp_path, samples[1:2], processor, seq=20)


def test_collator_pads_concatenates_and_counts_tokens(tmp_path, processor):
    a, b = jpeg(tmp_path / "a.jpg", seed=1), jpeg(tmp_path / "b.jpg", (120, 60), seed=2)
    samples = [{"images": [a], "messages": _turns("<image>x", "y")},
               {"messages": _turns("a longer text-only question here", "and a longer answer too")},
               {"images": [b], "messages": _turns("<image>z", "w")}]
    ds = build(tmp_path, samples, processor)
    items = [ds[i] for i in range(3)]
    pad = processor.tokenizer.pad_token_id
    batch = Collator(pad)(items)
    n = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape == (3, n)
    for r, it in enumerate(items):
        L = len(it["input_ids"])
        assert torch.equal(batch["input_ids"][r, :L], it["input_ids"]) and (batch["input_ids"][r, L:] == pad).all()
        assert torch.equal(batch["labels"][r, :L], it["labels"]) and (batch["labels"][r, L:] == -100).all()
        assert batch["attention_mask"][r].tolist() == [1] * L + [0] * (n - L)
        assert torch.equal(batch["mm_token_type_ids"][r, :L], it["mm_token_type_ids"])
        assert (batch["mm_token_type_ids"][r, L:] == 0).all()
    assert batch["num_tokens"] == sum(len(it["input_ids"]) for it in items)
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([items[0]["image_grid_thw"], items[2]["image_grid_thw"]]))
    text_only = Collator(pad)([items[1]])
    assert "pixel_values" not in text_only and "image_grid_thw" not in text_only


def _steps(sampler, n_steps):
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.grad_acc)] for _ in range(n_steps)]


def test_sampler_ranks_are_disjoint_and_cover_the_global_batch():
    n, mbs, gbs, dp = 50, 2, 12, 3          # grad_acc 2; 4 global batches per epoch, 2 samples left out
    runs = [_steps(MicroBatchSampler(n, mbs, gbs, r, dp, seed=3), 8) for r in range(dp)]
    order0 = MicroBatchSampler(n, mbs, gbs, 0, dp, seed=3).epoch_order(0).tolist()
    order1 = MicroBatchSampler(n, mbs, gbs, 0, dp, seed=3).epoch_order(1).tolist()
    assert order0 != order1 and sorted(order0) == list(range(n))
    for step in range(8):
        per_rank = [[i for mb in runs[r][step] for i in mb] for r in range(dp)]
        assert all(len(mb) == mbs for r in range(dp) for mb in runs[r][step])
        order, g = (order0, step) if step < 4 else (order1, step - 4)
        assert sorted(sum(per_rank, [])) == sorted(order[g * gbs:(g + 1) * gbs])  # exactly the global batch
        # micro-batch j of rank r is positions (j*dp + r)*mbs ... of the global batch
        assert runs[1][step][1] == order[g * gbs + (1 * dp + 1) * mbs:][:mbs]
    unshuffled = _steps(MicroBatchSampler(8, 2, 4, 1, 2, shuffle=False), 3)
    assert unshuffled == [[[2, 3]], [[6, 7]], [[2, 3]]]


def test_sampler_resumes_from_consumed_samples_and_state_dict():
    straight = _steps(MicroBatchSampler(50, 2, 8, 1, 2, seed=5), 14)   # crosses into epoch 2
    assert _steps(MicroBatchSampler(50, 2, 8, 1, 2, seed=5, consumed_samples=3 * 8), 11) == straight[3:]
    s = MicroBatchSampler(50, 2, 8, 1, 2, seed=5)
    _steps(s, 7)
    assert s.state_dict()["consumed_samples"] == 7 * 8
    resumed = MicroBatchSampler(50, 2, 8, 1, 2, seed=5)
    resumed.load_state_dict(s.state_dict())
    assert _steps(resumed, 7) == straight[7:]
    with pytest.raises(ValueError, match="global_batch_size=8 but this run has 16"):
        MicroBatchSampler(50, 2, 16, 1, 2, seed=5).load_state_dict(s.state_dict())


def test_sampler_without_drop_last_completes_the_tail_batch():
    s = MicroBatchSampler(10, 2, 4, 0, 1, shuffle=False, drop_last=False)
    assert s.batches_per_epoch == 3
    flat = [i for step in _steps(s, 4) for mb in step for i in mb]
    assert flat == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 0, 1, 2, 3]
    assert _steps(MicroBatchSampler(3, 1, 4, 0, 1, shuffle=False, drop_last=False), 2) == [[[0], [1], [2], [0]]] * 2


def test_sampler_errors():
    with pytest.raises(ValueError, match="global batch size 8 must be a multiple of micro batch size 3 x "
                                         "data-parallel size 2"):
        MicroBatchSampler(50, 3, 8, 0, 2)
    with pytest.raises(ValueError, match="the dataset has 5 samples, fewer than one global batch"):
        MicroBatchSampler(5, 1, 8, 0, 1)
    with pytest.raises(ValueError, match="consumed_samples 12 is not a non-negative multiple"):
        MicroBatchSampler(50, 1, 8, 0, 1, consumed_samples=12)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        MicroBatchSampler(50, 1, 8, 2, 2)


def test_dataloader_with_workers_yields_the_sampler_batches(tmp_path, processor):
    a = jpeg(tmp_path / "a.jpg")
    samples = [{"images": [a], "messages": _turns(f"<image>q{i}", f"a{i}")} if i % 3 == 0
               else {"messages": _turns(f"q{i}", f"a{i}")} for i in range(8)]
    ds = build(tmp_path, samples, processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    sampler = MicroBatchSampler(len(ds), 2, 4, 0, 1, seed=1)
    expected = [collate([ds[i] for i in idx]) for idx in [x for step in _steps(sampler, 3) for x in step]]
    loader = DataLoader(ds, batch_sampler=MicroBatchSampler(len(ds), 2, 4, 0, 1, seed=1), collate_fn=collate,
                        num_workers=2)
    got = [b for b, _ in zip(loader, range(6))]
    for b, e in zip(got, expected):
        assert b.keys() == e.keys() and all(torch.equal(b[k], e[k]) if torch.is_tensor(e[k]) else b[k] == e[k]
                                            for k in e)


def test_data_json_validation_and_unsupported_features(tmp_path):
    for example in ("data_2b.json", "data_7b.json"):  # MindSpeed-MM's examples load as they are
        cfg = load_data_config(REPO / "examples" / "qwen2vl" / example)
        assert unsupported_features(cfg) == []
        assert cfg.dataset_param.basic_parameters.preprocessing_num_workers == 16
    text = {"messages": _turns("q", "a")}
    cases = [
        (dict(basic={"colour": "red"}), r"data\.json: dataset_param\.basic_parameters\.colour: unknown key"),
        (dict(attr={"colour": "red"}), r"data\.json: dataset_param\.attr\.colour: unknown key"),
        (dict(top={"source": "x"}), r"data\.json: source: unknown key"),
        (dict(top={"dataloader_param": {"collate_param": {"x": 1}}}),
         r"data\.json: dataloader_param\.collate_param\.x: unknown key"),
        (dict(basic={"max_samples": "many"}), r"data\.json: dataset_param\.basic_parameters\.max_samples: "
                                              r"expected an integer, got 'many'"),
        (dict(basic={"max_samples": 0}), r"basic_parameters\.max_samples: must be >= 1, got 0"),
        (dict(basic={"template": "llava"}), r"basic_parameters\.template: expected 'qwen2vl', .* got 'llava'"),
        (dict(basic={"dataset": "a.json, b.json"}), r"basic_parameters\.dataset: .*no spaces"),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_data_config(write_config(tmp_path, [text], **kw))
    cfg = load_data_config(write_config(tmp_path, [text], basic={
        "streaming": True, "packing": True, "val_rate": 0.1, "val_dataset": "v.json",
        "mask_history": True, "train_on_prompt": True}, attr={**MLLM_ATTR, "videos": "videos", "audios": "audios"}))
    problems = unsupported_features(cfg)
    for key in ("streaming", "val_rate", "val_dataset"):
        assert any(key in p for p in problems), key
    assert not any(k in p for p in problems for k in ("packing", "mask_history", "train_on_prompt", "videos",
                                                        "audios"))
    cfg.dataset_param.attr.ranking = True   # preference pairs cannot be packed
    assert any("packing: true does not apply to preference pairs" in p for p in unsupported_features(cfg))


def test_bundled_demo_data(tmp_path, processor):
    root = demo_data_dir()
    records = json.loads((root / "demo.json").read_text())
    assert len(records) >= 40
    assert 0.25 <= sum("images" not in r for r in records) / len(records) <= 0.4
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) < 300_000
    cfg = {"dataset_param": {"preprocess_parameters": {"image_min_pixels": 28 * 28, "image_max_pixels": 112 * 112},
                             "basic_parameters": {"dataset_dir": str(root), "dataset": str(root / "demo.json")},
                             "attr": MLLM_ATTR}}
    (tmp_path / "data.json").write_text(json.dumps(cfg))
    ds = build_train_dataset(load_data_config(tmp_path / "data.json"), processor, 512)
    assert len(ds) == len(records)
    assert [("pixel_values" in ds[i]) for i in range(len(ds))] == ["images" in r for r in records]


def _expect(tmp, processor, samples, match, **kw):
    """Building the dataset and reading every item must fail with ``match``."""
    with pytest.raises((DataError, ConfigError), match=match):
        ds = build(tmp, samples, processor, **kw)
        for i in range(len(ds)):
            ds[i]


def test_bad_input_corpus(tmp_path, processor):
    good = jpeg(tmp_path / "good.jpg")
    sliver = jpeg(tmp_path / "sliver.jpg", (250, 1))
    Image.new("RGB", (64, 64), "red").save(tmp_path / "truncated.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "truncated.jpg").read_bytes()[:300])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ok = _turns("<image>q", "a")
    text = {"messages": _turns("q", "a")}
    d = r"d\.json: sample 1"
    cases = [
        ({"images": ["missing.jpg"], "messages": ok}, rf"{d}: image file not found: .*missing\.jpg"),
        ({"images": ["garbage.jpg"], "messages": ok}, rf"{d}: image .*garbage\.jpg cannot be decoded"),
        ({"images": ["truncated.jpg"], "messages": ok}, rf"{d}: image .*truncated\.jpg cannot be decoded"),
        ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
         rf"{d}: turn 0 has unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}]},
         rf"{d}: roles must alternate .* turn 1 is 'user', expected 'assistant'"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
         rf"{d}: roles must alternate .* turn 1 is 'assistant', expected 'user'"),
        ({"messages": _turns("q")}, rf"{d}: the conversation must end with an assistant turn"),
        ({"images": [good, good], "messages": ok}, rf"{d}: 1 <image> tag\(s\) but 2 image\(s\)"),
        ({"images": [good], "messages": _turns("<image><image>q", "a")}, rf"{d}: 2 <image> tag\(s\) but 1 image\(s\)"),
        ({"messages": ok}, rf"{d}: 1 <image> tag\(s\) but 0 image\(s\)"),
        ({"images": [good], "messages": _turns("q", "<image>a")}, rf"{d}: turn 1 \(assistant\) contains <image>"),
        ({"messages": _turns("q <|image_pad|>", "a")}, rf"{d}: turn 0 contains the reserved token <\|image_pad\|>"),
        ({"messages": []}, rf"{d}: the conversation 'messages' is empty"),
        ({"messages": [{"role": "system", "content": "s"}]}, rf"{d}: empty conversation"),
        ({"messages": [{"role": "user", "text": "q"}]}, rf"{d}: turn 0 needs keys 'role' and 'content'"),
        ({"images": [good, 3], "messages": ok}, rf"{d}: 'images' must be a list of image paths"),
        ("just a string", rf"{d}: expected a JSON object, got str"),
    ]
    for bad, match in cases:
        _expect(tmp_path, processor, [text, bad], match)
    _expect(tmp_path, processor, [text, {"messages": ok}], rf"{d}: has <image> tags but data\.json "
            r"attr\.images is not set", attr={k: v for k, v in MLLM_ATTR.items() if k != "images"})
    _expect(tmp_path, processor, [json.dumps(text), "{not json"], r"d\.jsonl: line 2 is not valid JSON",
            name="d.jsonl")
    _expect(tmp_path, processor, [text], r"dataset: file 'nope\.json' not found", basic={"dataset": "nope.json"})
    (tmp_path / "obj.json").write_text(json.dumps({"a": 1}, indent=1))
    _expect(tmp_path, processor, [text], r"obj\.json: expected a JSON array of samples or JSONL, got a JSON dict",
            basic={"dataset": "obj.json"})
    _expect(tmp_path, processor, [text, {"images": [sliver], "messages": ok}],
            rf"{d}: image .*sliver\.jpg \(250x1\) cannot be used: absolute aspect ratio must be smaller than 200")


def test_jsonl_with_raw_line_separator_characters_reads_the_same_map_style_and_streaming(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 / U+0085 raw inside strings: still one record per line,
    in the map-style reader and in the streaming one."""
    from omnitune.data.formats import read_records
    from omnitune.data.streaming import iter_raw_records, parse_record

    recs = [{"messages": [{"role": "user", "content": "a\u2028b"}, {"role": "assistant", "content": "c\u0085d"}]},
            {"messages": [{"role": "user", "content": "e\r"}, {"role": "assistant", "content": "f"}]}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert read_records(f) == recs
    assert [parse_record(f, r) for _, r in iter_raw_records(f)] == recs
