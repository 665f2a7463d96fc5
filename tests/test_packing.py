"""Sequence packing (data.json packing: true): a packed row gives each sample the losses and
gradients it has alone (own mRoPE positions, attention inside the sample only), the loss types keep
their meaning, rows are a partition of the data, and training with packing (map-style and
streaming) runs and resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch
from media_util import jpeg, mp4, wav, write_config

from omnitune.config.data import load_data_config
from omnitune.data.collator import Collator
from omnitune.data.dataset import SFTDataset
from omnitune.data.packing import PackedDataset, pack_indices
from omnitune.models.registry import get_family
from omnitune.ops.packing import packed_position_ids
from omnitune.train.loss import IGNORE_INDEX, local_counts, shift_labels, token_weights
from omnitune.train.model import load_hf_model

OMNI = ("qwen2_5_omni", "qwen3_omni_moe")


# ------------------------------------------------------------------------------------- rows
def test_pack_indices_is_a_partition_within_capacity_and_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (500,), generator=g).tolist() + [300, 300, 1]
    rows = pack_indices(lengths, 512)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert rows == pack_indices(lengths, 512)
    fill = sum(lengths) / (len(rows) * 512)
    assert fill > 0.95, fill          # best-fit decreasing on many small items packs tightly
    with pytest.raises(ValueError, match="sample 3 has 600 tokens, more than the packing capacity 512"):
        pack_indices([1, 2, 3, 600], 512)


def test_collated_row_masks_each_samples_first_label_and_numbers_segments():
    items = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(lab),
              "attention_mask": torch.ones(len(ids), dtype=torch.long),
              "mm_token_type_ids": torch.zeros(len(ids), dtype=torch.int32)}
             for ids, lab in (([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [-100, 7, 8, 9]))]
    b = Collator(0)([{"packed": items[:2]}, {"packed": items[2:]}])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    # the last position of sample 0 (token 3) predicts nothing: its target would be sample 1's first
    assert shift_labels(b["labels"])[0].tolist() == [2, 3, -100, 5, -100]


def test_per_sample_loss_weights_average_inside_each_packed_sample():
    labels = torch.tensor([[-100, 1, 1, -100, 1, 1, 1, 1, -100]])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1]])
    counts = local_counts([labels], [seg])
    assert counts.tolist() == [6.0, 2.0]          # 2 trained + 4 trained tokens, 2 samples
    w = token_weights(labels, "per_sample_loss", micro_batches=1, global_tokens=6, global_samples=2, segments=seg)
    assert torch.allclose(w[0, :8], torch.tensor([1 / 4, 1 / 4, 0, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 0]))
    assert local_counts([labels]).tolist() == [6.0, 1.0]   # unpacked view: one row = one sample


# ------------------------------------------------------------------------------------- parity
def _samples(tmp, family):
    d = tmp / "media"
    d.mkdir()
    omni = family in OMNI
    img_a, img_b = jpeg(d / "a.jpg", (84, 56), seed=1), jpeg(d / "b.jpg", (56, 112), seed=2)
    vid = mp4(d / "v.mp4", 8, 4, (56, 56), seed=3, audio_rate=16000 if omni else None)
    out = [
        {"messages": [{"role": "user", "content": "<image>What is drawn here?"},
                      {"role": "assistant", "content": "Noise in many colours, a wide picture."}], "images": [img_a]},
        {"messages": [{"role": "user", "content": "Say three words."},
                      {"role": "assistant", "content": "One two three."},
                      {"role": "user", "content": "And two more?"},
                      {"role": "assistant", "content": "Four five."}]},
        {"messages": [{"role": "user", "content": "<video>What moves in the clip?"},
                      {"role": "assistant", "content": "Bars sweep to the right."}], "videos": [vid]},
        {"messages": [{"role": "user", "content": "<image>And this one?"},
                      {"role": "assistant", "content": "A tall picture."}], "images": [img_b]},
    ]
    if omni:
        out.append({"messages": [{"role": "user", "content": "<audio>What do you hear?"},
                                 {"role": "assistant", "content": "A tone at 440 hertz."}],
                    "audios": [wav(d / "s.wav", 1.0, seed=4)]})
    return d, out


def _dataset(tmp, family, hf_dir):
    from transformers import AutoProcessor

    d, samples = _samples(tmp, family)
    pre = dict(video_min_pixels=28 * 28, video_max_pixels=56 * 56, video_fps=2.0, image_max_pixels=112 * 112,
               use_audio_in_video=family in OMNI)
    cfg = load_data_config(write_config(d, samples, template=get_family(family).template, pre=pre))
    ds = SFTDataset(cfg, AutoProcessor.from_pretrained(hf_dir), 1024)
    assert len(ds) == len(samples)
    return ds, Collator(151643, use_audio_in_video=family in OMNI)


def _token_losses(fam, model, batch):
    """Per-position cross-entropy (0 where untrained), from the family forward + lm_head."""
    hidden, _ = fam.forward_hidden(model, batch)
    t = shift_labels(batch["labels"])
    logits = fam.lm_head(model)(hidden).float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten().clamp(min=0), reduction="none")
    return ce.view(t.shape) * (t != IGNORE_INDEX)


CASES = [(f, "sdpa_packed") for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni",
                                      "qwen3_omni_moe")] + [("qwen2_vl", "sdpa"), ("qwen2_vl", "eager")]


@pytest.mark.parametrize("family,attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_packed_row_equals_samples_alone(family, attn, tiny_model_dir, tmp_path):
    """One row with image, text-only multi-turn, video (Omni: with its sound track interleaved) and
    audio samples: each sample's loss, and the gradient of their sum, equal the samples run one at a
    time (fp32, 1e-5); the packed positions are each sample's own; attention does not cross: changing
    sample 0 leaves the other samples' losses unchanged, and with plain causal attention over the row
    (the mask a non-packing trainer would use) they change. ``attn``: the text decoder's attention
    on packed rows: sdpa_packed (what packed training uses for sdpa: SDPA per sample), or transformers'
    block-diagonal mask with sdpa / eager."""
    from omnitune.ops.packing import use_packed_attention

    hf_dir = tiny_model_dir(family)
    fam = get_family(family)
    ds, collate = _dataset(tmp_path, family, hf_dir)
    model = load_hf_model(fam, str(hf_dir))
    if attn == "sdpa_packed":
        assert use_packed_attention(model, fam) == "sdpa_packed"
    else:
        fam.language_model(model).set_attn_implementation(attn)
    n = len(ds)
    items = [ds[i] for i in range(n)]
    packed = collate([{"packed": items}])
    seg = packed["segment_ids"][0]
    assert packed["input_ids"].shape[0] == 1 and int(seg.max()) == n - 1

    # alone: loss sums and summed gradients
    solo_loss, grads = [], None
    for it in items:
        model.zero_grad()
        ce = _token_losses(fam, model, collate([it]))
        ce.sum().backward()
        solo_loss.append(ce.sum().item())
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    model.zero_grad()
    ce = _token_losses(fam, model, packed)
    ce.sum().backward()
    packed_loss = [ce[0][seg == k].sum().item() for k in range(n)]
    for k in range(n):
        assert abs(packed_loss[k] - solo_loss[k]) <= 1e-5 * abs(solo_loss[k]), (k, packed_loss, solo_loss)
    # per parameter, relative to its own largest gradient entry (with a floor far below any real
    # gradient: e.g. attention k-biases have a gradient of exactly 0 up to rounding)
    floor = 1e-6 * max(g.abs().max().item() for g in grads)
    worst = 0.0
    for p, g in zip(model.parameters(), grads):
        pg = p.grad if p.grad is not None else torch.zeros_like(p)
        worst = max(worst, (pg - g).abs().max().item() / (g.abs().max().item() + floor))
    assert worst <= 1e-5, worst

    # positions: sample k of the row has exactly its own (alone) position ids
    pos = packed_position_ids(fam, model, packed)
    for k, it in enumerate(items):
        alone = collate([it])
        sub = {key: alone[key] for key in alone if key != "labels"}
        own = fam.rope_index(model, sub)[:, 0]
        assert torch.equal(pos[1:, 0, seg == k], own), k
        assert torch.equal(pos[0, 0, seg == k], torch.arange(int((seg == k).sum())))

    with torch.no_grad():
        base = _token_losses(fam, model, packed)[0]
        changed = dict(packed, input_ids=packed["input_ids"].clone())
        text0 = (seg == 0) & (packed["mm_token_type_ids"][0] == 0) & (packed["labels"][0] != IGNORE_INDEX)
        changed["input_ids"][0, text0] = 1000   # other answer tokens in sample 0
        after = _token_losses(fam, model, changed)[0]
        assert (after[seg == 0] - base[seg == 0]).abs().max() > 1e-3
        assert torch.equal(after[seg > 0], base[seg > 0])
        crossing = {k: v for k, v in packed.items() if k != "segment_ids"}   # one causal sequence
        crossing["attention_mask"] = torch.ones_like(packed["attention_mask"])
        ce_cross = _token_losses(fam, model, crossing)[0]
        assert (ce_cross[seg > 0] - base[seg > 0]).abs().max() > 1e-3   # the test sees crossing attention


def test_packed_dataset_rows_hold_every_sample_once(tiny_model_dir, tmp_path):
    ds, collate = _dataset(tmp_path, "qwen2_vl", tiny_model_dir("qwen2_vl"))
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    cap = max(lengths) + min(lengths)
    packed = PackedDataset(ds, cap)
    assert sorted(i for r in packed.rows for i in r) == list(range(len(ds)))
    assert len(packed) < len(ds)
    b = collate([packed[k] for k in range(len(packed))])
    assert int(b["attention_mask"].sum()) == sum(lengths)
    assert b["input_ids"].shape[1] <= cap
    assert "rows of <= %d tokens" % cap in packed.describe()


# ------------------------------------------------------------------------------------- training
def _configs(tmp, hf_dir, **basic):
    from spine_util import write_configs

    data_json, model_json = write_configs(tmp / "cfg", hf_dir)
    cfg = json.loads(data_json.read_text())
    cfg["dataset_param"]["basic_parameters"].update(basic)
    data_json.write_text(json.dumps(cfg))
    return data_json, model_json


def _train_and_resume(tmp, hf_dir, data_json, model_json, extra, iters=10):
    """``iters`` steps straight; half, stop, resume to ``iters``. Returns (straight losses, resumed
    losses, stdout of the straight run)."""
    from spine_util import losses, omnitune, train_flags

    straight, stopped, half = tmp / "straight", tmp / "stopped", str(iters // 2)
    r = omnitune(["train", *train_flags(data_json, model_json, iters=iters, save=straight, load=hf_dir, extra=extra)])
    omnitune(["train", *train_flags(data_json, model_json, iters=iters, save=stopped, load=hf_dir,
                                    extra=[*extra, "--save-interval", half, "--exit-interval", half])])
    omnitune(["train", *train_flags(data_json, model_json, iters=iters, save=stopped, load=stopped, extra=extra)])
    return losses(straight), losses(stopped), r.stdout


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_packed_training_learns_and_resumes_exactly(streaming, tmp_path):
    from omnitune.models.tiny import build_tiny_model

    hf_dir = build_tiny_model("qwen2_vl", tmp_path / "tiny")
    data_json, model_json = _configs(tmp_path, hf_dir, packing=True, streaming=streaming)
    extra = ["--seq-length", "128", "--lr", "3e-3"]
    ref, got, out = _train_and_resume(tmp_path, hf_dir, data_json, model_json, extra, iters=6)
    assert sorted(ref) == list(range(1, 7))
    assert [got[i] for i in range(1, 7)] == [ref[i] for i in range(1, 7)]
    assert sum(ref[i] for i in (5, 6)) < 0.95 * sum(ref[i] for i in (1, 2)), ref
    if not streaming:
        assert "packing    : 48 samples in 17 rows of <= 128 tokens" in out, out[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # 4 rows per step, the longest sample has 49 tokens: rows hold several samples
    assert all(r["tokens"] > 4 * 49 for r in recs), [r["tokens"] for r in recs]


def test_token_budget_training_resumes_exactly_and_counts_samples(tmp_path):
    from omnitune.models.tiny import build_tiny_model

    hf_dir = build_tiny_model("qwen2_vl", tmp_path / "tiny")
    data_json, model_json = _configs(tmp_path, hf_dir)
    extra = ["--token-budget", "512", "--calculate-per-sample-loss"]
    ref, got, _ = _train_and_resume(tmp_path, hf_dir, data_json, model_json, extra, iters=6)
    assert sorted(ref) == list(range(1, 7)) and [got[i] for i in range(1, 7)] == [ref[i] for i in range(1, 7)]
    recs = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    consumed = [r["consumed_samples"] for r in recs]
    steps = [b - a for a, b in zip([0] + consumed, consumed)]
    assert len(set(steps)) > 1 and min(steps) >= 4, steps   # grad-acc 4 micro-batches of varying size


def test_packing_and_token_budget_refusals(tmp_path):
    from spine_util import omnitune, train_flags

    from omnitune.models.tiny import build_tiny_model

    hf_dir = build_tiny_model("qwen2_vl", tmp_path / "tiny")
    data_json, model_json = _configs(tmp_path, hf_dir, packing=True)
    flags = train_flags(data_json, model_json, iters=2, save=tmp_path / "s", load=hf_dir)
    r = omnitune(["train", *flags, "--token-budget", "4096", "--dry-run"], check=False)
    assert r.returncode == 2 and "--token-budget: not with" in r.stderr and "basic_parameters.packing" in r.stderr
    r = omnitune(["train", "--nproc-per-node", "2", *flags, "--context-parallel-size", "2", "--dry-run"], check=False)
    assert r.returncode == 2 and "packing with --context-parallel-size 2 is not implemented" in r.stderr, r.stderr
    plain, _ = _configs(tmp_path / "p", hf_dir)
    r = omnitune(["train", *train_flags(plain, model_json, iters=2, save=tmp_path / "s", load=hf_dir),
                  "--token-budget", "100", "--dry-run"], check=False)
    assert r.returncode == 2 and "--token-budget 100: must be >= --seq-length 512" in r.stderr, r.stderr


def test_sdpa_packed_equals_block_diagonal_sdpa_and_skips_cross_blocks():
    """The per-sample SDPA of packed rows equals SDPA with the block-diagonal causal mask (GQA:
    8 query heads on 2 key/value heads), and samples are computed apart (an update in sample 0's
    keys changes nothing in sample 1)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from omnitune.ops.packing import _segments, packed_sdpa_forward

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 16, generator=g) for h in (8, 2, 2))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1]])
    assert _segments(pos[0]) == [(0, 4), (4, 7), (7, 11)]
    seg = torch.stack([torch.tensor([0] * 4 + [1] * 3 + [2] * 4), torch.tensor([0] * 6 + [1] * 3 + [2] * 2)])
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    mask = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]
    ref, _ = sdpa_attention_forward(Attn(), q, k, v, mask, scaling=0.25)
    got, _ = packed_sdpa_forward(Attn(), q, k, v, mask, position_ids=pos, scaling=0.25)
    assert torch.allclose(got, ref, atol=1e-6), (got - ref).abs().max()
    k2 = k.clone()
    k2[0, :, :4] += 1.0
    again, _ = packed_sdpa_forward(Attn(), q, k2, v, mask, position_ids=pos, scaling=0.25)
    assert torch.equal(again[0, 4:], got[0, 4:]) and not torch.equal(again[0, :4], got[0, :4])
    plain, _ = packed_sdpa_forward(Attn(), q, k, v, None)   # no positions: plain causal sdpa over the row
    assert not torch.allclose(plain, ref, atol=1e-3)
