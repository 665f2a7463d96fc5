"""Data pipeline: token ids/labels/pixels equal the HF processor's, masking, collator, sampler,
multi-dataset, and the bad-input corpus (each case: a clear error naming file and sample)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnitune.config.data import load_data_config
from omnitune.config.errors import ConfigError
from omnitune.data import Collator, DataError, MicroBatchSampler, build_train_dataset
from omnitune.models.tiny import build_tiny_model

IMAGE_PAD, VSTART, VEND, IM_START = 151655, 151652, 151653, 151644


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("data") / "tiny_qwen2vl")


@pytest.fixture(scope="module")
def processor(hf_dir):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(hf_dir)


def jpeg(path: Path, size=(80, 64), seed=0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.name


def make_cfg(tmp: Path, samples, *, name="d.json", extra_basic=None, extra=None, attr=None, jsonl=False) -> Path:
    f = tmp / name
    if jsonl:
        f.write_text("\n".join(s if isinstance(s, str) else json.dumps(s) for s in samples) + "\n")
    else:
        f.write_text(json.dumps(samples))
    basic = {"template": "qwen2vl", "dataset_dir": str(tmp), "dataset": name}
    basic.update(extra_basic or {})
    cfg = {"dataset_param": {"preprocess_parameters": {"image_min_pixels": 56 * 56,
                                                       "image_max_pixels": 28 * 28 * 1280},
                             "basic_parameters": basic,
                             "attr": attr or {"images": "images", "messages": "messages"}}}
    cfg.update(extra or {})
    out = tmp / "data.json"
    out.write_text(json.dumps(cfg))
    return out


def build(tmp, samples, processor, seq=2048, **kw):
    return build_train_dataset(load_data_config(make_cfg(tmp, samples, **kw)), processor, seq)


def hf_reference(processor, messages, images):
    """What the HF processor + chat template produce for the same conversation."""
    hf_msgs = []
    for m in messages:
        if m["role"] == "user":
            parts = m["content"].split("<image>")
            content = [{"type": "text", "text": parts[0]}] if parts[0] else []
            for p in parts[1:]:
                content.append({"type": "image"})
                if p:
                    content.append({"type": "text", "text": p})
            hf_msgs.append({"role": "user", "content": content})
        else:
            hf_msgs.append({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]})
    text = processor.apply_chat_template(hf_msgs, tokenize=False)
    imgs = [Image.open(p).convert("RGB") for p in images] or None
    return processor(text=[text], images=imgs, return_tensors="pt")


@pytest.mark.parametrize("case", ["one_image", "two_images_multi_turn_system", "text_only"])
def test_ids_and_media_equal_hf_processor(tmp_path, processor, case):
    a, b = jpeg(tmp_path / "a.jpg", (80, 64), 1), jpeg(tmp_path / "b.jpg", (150, 100), 2)
    if case == "one_image":
        msgs = [{"role": "user", "content": "<image>What is in the picture?"},
                {"role": "assistant", "content": "Noise, mostly."}]
        images = [a]
    elif case == "two_images_multi_turn_system":
        msgs = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Compare <image> and <image>, please."},
                {"role": "assistant", "content": "The second is wider."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
        images = [a, b]
    else:
        msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
        images = []
    sample = {"messages": msgs, **({"images": images} if images else {})}
    ds = build(tmp_path, [sample], processor)
    item = ds[0]
    ref = hf_reference(processor, msgs, [tmp_path / x for x in images])
    assert item["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert item["mm_token_type_ids"].tolist() == ref["mm_token_type_ids"][0].tolist()
    if images:
        assert torch.equal(item["image_grid_thw"], ref["image_grid_thw"])
        assert torch.equal(item["pixel_values"], ref["pixel_values"])
        assert int((item["input_ids"] == IMAGE_PAD).sum()) == int(ref["image_grid_thw"].prod(-1).sum()) // 4
    else:
        assert "pixel_values" not in item


def _segments(ids, labels):
    """Texts of the trained spans."""
    out, cur = [], []
    for i, l in zip(ids, labels):
        if l != -100:
            cur.append(i)
        elif cur:
            out.append(cur); cur = []
    if cur:
        out.append(cur)
    return out


def test_label_masking_train_on_prompt_and_mask_history(tmp_path, processor):
    msgs = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Second answer."}]
    tok = processor.tokenizer
    ds = build(tmp_path, [{"messages": msgs}], processor)
    it = ds.items[0]
    spans = [tok.decode(s) for s in _segments(it["input_ids"], it["labels"])]
    assert spans == ["First answer.<|im_end|>\n", "Second answer.<|im_end|>\n"]

    ds = build(tmp_path, [{"messages": msgs}], processor, extra_basic={"mask_history": True})
    it = ds.items[0]
    assert [tok.decode(s) for s in _segments(it["input_ids"], it["labels"])] == ["Second answer.<|im_end|>\n"]

    ds = build(tmp_path, [{"messages": msgs}], processor, extra_basic={"train_on_prompt": True})
    it = ds.items[0]
    assert it["labels"] == it["input_ids"]


def test_sharegpt_format_and_system_column(tmp_path, processor):
    sample = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
              "sys": "Be terse."}
    attr = {"messages": "conversations", "role_tag": "from", "content_tag": "value", "user_tag": "human",
            "assistant_tag": "gpt", "system": "sys"}
    ds = build(tmp_path, [sample], processor, attr=attr)
    text = processor.tokenizer.decode(ds.items[0]["input_ids"])
    assert text == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")


def test_images_without_tags_get_them_prepended(tmp_path, processor):
    a = jpeg(tmp_path / "a.jpg")
    ds = build(tmp_path, [{"images": [a], "messages": [{"role": "user", "content": "What?"},
                                                        {"role": "assistant", "content": "X."}]}], processor)
    ids = ds.items[0]["input_ids"]
    assert ids.count(VSTART) == 1 and ids.count(IMAGE_PAD) > 0


def test_multi_dataset_max_samples_dataset_dir_and_jsonl(tmp_path, processor, monkeypatch):
    sub = tmp_path / "data"
    sub.mkdir()
    jpeg(sub / "img.jpg")
    one = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(5)]
    two = [{"images": ["img.jpg"], "messages": [{"role": "user", "content": f"<image>q{i}"},
                                                 {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    (sub / "one.json").write_text(json.dumps(one))
    (sub / "two.jsonl").write_text("\n".join(json.dumps(x) for x in two))
    cfg = {"dataset_param": {"basic_parameters": {"dataset_dir": str(sub), "dataset": "./data/one.json,./data/two.jsonl",
                                                  "max_samples": 3},
                             "attr": {"images": "images"}}}
    (tmp_path / "data.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path / "data")  # dataset paths resolve against dataset_dir too
    ds = build_train_dataset(load_data_config(tmp_path / "data.json"), processor, 2048)
    assert len(ds) == 6
    assert sum("pixel_values" in ds[i] for i in range(len(ds))) == 3


def test_long_sample_truncates_text_but_drops_when_media_would_be_cut(tmp_path, processor):
    a = jpeg(tmp_path / "a.jpg", (112, 112))
    long_text = " ".join(["word"] * 200)
    samples = [
        {"messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": long_text}]},
        {"images": [a], "messages": [{"role": "user", "content": long_text + " <image>"},
                                     {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "fine"}]},
    ]
    ds = build(tmp_path, samples, processor, seq=100)
    assert len(ds) == 2 and ds.dropped == 1 and ds.truncated == 1
    assert all(len(it["input_ids"]) <= 100 for it in ds.items)


def test_collator_pads_and_concatenates(tmp_path, processor):
    a = jpeg(tmp_path / "a.jpg")
    samples = [{"images": [a], "messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}]},
               {"messages": [{"role": "user", "content": "a longer text question here"},
                             {"role": "assistant", "content": "and a longer answer too"}]}]
    ds = build(tmp_path, samples, processor)
    items = [ds[0], ds[1]]
    batch = Collator(processor.tokenizer.pad_token_id)(items)
    n = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == (2, n)
    for r, it in enumerate(items):
        L = len(it["input_ids"])
        assert batch["attention_mask"][r].sum() == L
        assert (batch["labels"][r, L:] == -100).all()
        assert (batch["input_ids"][r, L:] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(batch["pixel_values"], items[0]["pixel_values"])
    text_only = Collator(processor.tokenizer.pad_token_id)([ds[1]])
    assert "pixel_values" not in text_only


def test_sampler_ranks_disjoint_cover_global_batch_and_resume():
    def take(rank, consumed=0, n_steps=5):
        s = MicroBatchSampler(50, 2, 8, rank, 2, shuffle=True, seed=3, consumed_samples=consumed)
        it = iter(s)
        return [[next(it) for _ in range(s.grad_acc)] for _ in range(n_steps)]
    r0, r1 = take(0), take(1)
    for step in range(5):
        a = [i for mb in r0[step] for i in mb]
        b = [i for mb in r1[step] for i in mb]
        assert len(a) == len(b) == 4 and not set(a) & set(b)
    # an epoch is 6 global batches of 8 out of 50 samples; step 5 lies in the first epoch
    first_epoch = {i for step in range(5) for mb in r0[step] + r1[step] for i in mb}
    assert len(first_epoch) == 40
    # resuming from consumed samples replays exactly what the straight run sees next
    straight = take(0, 0, 9)
    assert take(0, 3 * 8, 6) == straight[3:]
    with pytest.raises(ValueError, match="multiple of micro batch size"):
        MicroBatchSampler(50, 3, 8, 0, 2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        MicroBatchSampler(5, 1, 8, 0, 1)


def _bad(tmp, processor, samples, match, **kw):
    with pytest.raises((DataError, ConfigError), match=match):
        ds = build(tmp, samples, processor, **kw)
        for i in range(len(ds)):
            ds[i]


def test_bad_input_corpus(tmp_path, processor):
    good = jpeg(tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ok = [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]
    d = r"d\.json: sample 1"
    text = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    cases = [
        ([text, {"images": ["missing.jpg"], "messages": ok}], rf"{d}: image file not found: .*missing\.jpg"),
        ([text, {"images": ["corrupt.jpg"], "messages": ok}], rf"{d}: image .*corrupt\.jpg cannot be decoded"),
        ([text, {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}],
         rf"{d}: turn 0 has unknown role 'robot'"),
        ([text, {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]}], rf"{d}: roles must alternate"),
        ([text, {"images": [good, good], "messages": ok}], rf"{d}: 1 <image> tag\(s\) but 2 image\(s\)"),
        ([text, {"images": [good], "messages": [{"role": "user", "content": "<image><image>q"},
                                                {"role": "assistant", "content": "a"}]}],
         rf"{d}: 2 <image> tag\(s\) but 1 image\(s\)"),
        ([text, {"messages": []}], rf"{d}: 'messages' is missing or empty"),
        ([text, {"messages": [{"role": "user", "content": "q"}]}], rf"{d}: the conversation must end with an assistant"),
    ]
    for samples, match in cases:
        _bad(tmp_path, processor, samples, match)
    _bad(tmp_path, processor, [json.dumps(text), "{not json"], r"d\.jsonl: line 2 is not valid JSON",
         name="d.jsonl", jsonl=True)
    _bad(tmp_path, processor, [text], r"data\.json: dataset_param\.basic_parameters\.colour: unknown key",
         extra_basic={"colour": "red"})
    _bad(tmp_path, processor, [text], r"dataset: file 'nope\.json' not found",
         extra_basic={"dataset": "nope.json"})
