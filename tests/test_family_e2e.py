"""Issue 5 acceptance, per family, through the real CLI: a dataset on disk with all of the family's
modalities (VL: images, videos, text-only; Omni: + audios, and for Qwen3-Omni the videos' own sound
via use_audio_in_video), the family's template, a model.json; then

1. ``omnitune train --nproc-per-node 2`` (FSDP2 on gloo), 10 iterations, saves at 5 and 10: the loss falls;
2. resuming the straight run from iteration 5 (its ``latest`` file edited to 5, in a copy) logs the
   straight run's losses for 6..10 exactly (same reduction order: float equality) and ends with the
   same weights;
3. ``omnitune export`` of iteration 10 -> HF folder; plain transformers ``from_pretrained`` (Omni: the
   FULL class, its talker / vocoder tensors equal to the original folder's) gives logits equal to
   omnitune's training forward of the DCP checkpoint on a collated batch with every modality.
"""
from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from media_util import jpeg, mp4, wav

from spine_util import losses, omnitune, train_flags

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni", "qwen3_omni_moe"]
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")
AUDIO_IN_VIDEO = ("qwen3_omni_moe",)   # the other Omni family trains on silent videos + separate audios
SEQ = 256


def _dataset(family, data: Path) -> tuple[list[dict], bool]:
    """(samples, use_audio_in_video): every modality of the family, alone and mixed, plus text-only;
    short fixed answers per modality so 10 steps visibly learn them."""
    omni = family.name in OMNI
    aiv = family.name in AUDIO_IN_VIDEO
    data.mkdir(parents=True, exist_ok=True)
    img = [jpeg(data / f"i{k}.jpg", size, seed=k) for k, size in enumerate([(56, 56), (64, 64), (64, 56)])]
    vid = [mp4(data / f"v{k}.mp4", n_frames=4 + 2 * k, fps=4, size=(56, 56), seed=k,
               audio_rate=16000 if aiv else None) for k in range(2)]
    aud = [wav(data / f"a{k}.wav", seconds=1.0 + 0.25 * k, seed=k, freq=300 + 200 * k) for k in range(2)] if omni else []

    def s(q, a, **media):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **media}

    samples = [
        s("<image>What is shown?", "Coloured noise.", images=[img[0]]),
        s("<video>What happens?", "Bars move to the right.", videos=[vid[0]]),
        s("Say hello.", "Hello there."),
        s("<image>And here?", "Coloured noise.", images=[img[1]]),
        s("<video>Describe the clip.", "Bars move to the right.", videos=[vid[1]]),
        s("<image><video>Compare them.", "Noise, then bars.", images=[img[2]], videos=[vid[0]]),
    ]
    if omni:
        samples += [
            s("<audio>What do you hear?", "A steady tone.", audios=[aud[0]]),
            s("<image><audio>Picture and sound?", "Noise and a tone.", images=[img[0]], audios=[aud[1]]),
        ]
    else:
        samples += [s("Say goodbye.", "Goodbye now."),
                    s("<video><image>Which comes first?", "Bars, then noise.", videos=[vid[1]], images=[img[1]])]
    return samples, aiv


def _configs(family, hf_dir: Path, root: Path) -> tuple[Path, Path, bool, list[dict]]:
    samples, aiv = _dataset(family, root / "media")
    (root / "media" / "train.json").write_text(json.dumps(samples))
    attr = {"images": "images", "videos": "videos", "messages": "messages", "role_tag": "role",
            "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    if family.name in OMNI:
        attr["audios"] = "audios"
    data = {"dataset_param": {
        "dataset_type": "huggingface",
        "preprocess_parameters": {"model_name_or_path": str(hf_dir), "image_min_pixels": 28 * 28,
                                  "image_max_pixels": 64 * 64, "video_min_pixels": 28 * 28,
                                  "video_max_pixels": 64 * 64, "video_fps": 2.0, "video_maxlen": 8,
                                  "use_audio_in_video": aiv},
        "basic_parameters": {"template": family.template, "dataset_dir": str(root / "media"),
                             "dataset": "train.json", "cache_dir": str(root / "cache")},
        "attr": attr},
        "dataloader_param": {"dataloader_mode": "sampler", "drop_last": True, "shuffle": True,
                             "sampler_type": "BaseRandomBatchSampler",
                             "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True}}}
    model = {"model_id": family.model_ids[0],
             "image_encoder": {"vision_encoder": {"freeze": False}, "vision_projector": {"freeze": False}},
             "text_decoder": {"freeze": False}}
    if family.name in OMNI:
        model["audio_encoder"] = {"audio_encoder": {"freeze": False}}
    data_json, model_json = root / "data.json", root / "model.json"
    data_json.write_text(json.dumps(data, indent=2))
    model_json.write_text(json.dumps(model, indent=2))
    return data_json, model_json, aiv, samples


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_train_resume_export_through_cli(name, tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from omnitune.checkpoint.dcp import load_model_weights_from_dcp, resolve_checkpoint
    from omnitune.cli.main import main as cli_main
    from omnitune.config.data import load_data_config
    from omnitune.data import Collator, MicroBatchSampler, build_train_dataset
    from omnitune.models.registry import get_family
    from omnitune.train.model import load_hf_model

    t0 = time.perf_counter()
    times = {}

    def lap(what):   # per-phase wall time, shown with pytest -s
        nonlocal t0
        times[what] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()

    fam = get_family(name)
    hf_dir = tiny_model_dir(name)
    data_json, model_json, aiv, samples = _configs(fam, hf_dir, tmp_path)

    def train(save: Path, load: Path, extra=()):
        return omnitune(["train", "--nproc-per-node", "2",
                         *train_flags(data_json, model_json, iters=10, save=save, load=load, mbs=1, gbs=2,
                                      extra=["--seq-length", str(SEQ), "--lr", "5e-3", "--min-lr", "1e-3",
                                             "--save-interval", "5", *extra])])

    # 1. straight run: 10 iterations, checkpoints at 5 and 10, the loss falls
    straight = tmp_path / "straight"
    train(straight, hf_dir)
    lap("straight")
    ref = losses(straight)
    assert sorted(ref) == list(range(1, 11))
    assert (ref[9] + ref[10]) / 2 < 0.85 * (ref[1] + ref[2]) / 2, ref

    # 2. resume from iteration 5: a copy of the straight run's save dir whose `latest` file is edited to
    #    5 (the seed's way to pick an iteration; --exit-interval stops are tested in test_spine.py).
    #    Steps 6..10 give the straight run's losses exactly and iteration 10 the very same weights.
    stopped = tmp_path / "stopped"
    shutil.copytree(straight, stopped, ignore=shutil.ignore_patterns("iter_0000010"))
    (stopped / "latest_checkpointed_iteration.txt").write_text("5")
    metrics = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics
                                                   if m.get("iteration", 0) <= 5))
    r = train(stopped, stopped)
    assert "at iteration 5" in r.stdout
    lap("resume")
    got = losses(stopped)
    assert [got[i] for i in range(1, 11)] == [ref[i] for i in range(1, 11)], (got, ref)

    # 3. export of iteration 10 (the HF folder comes from the checkpoint's trainer state)
    # (the `omnitune` command's own main, in this process: a subprocess would only add ~5 s of imports)
    out = tmp_path / "export"
    assert cli_main(["export", "--load", str(straight), "--save", str(out)]) == 0
    lap("export")
    plain_full = fam.folder_class().from_pretrained(out, dtype=torch.float32).eval()
    assert type(plain_full).__name__ == (fam.hf_full_class_name or fam.hf_class_name)
    plain = getattr(plain_full, "thinker", plain_full) if fam.folder_prefix else plain_full

    # a collated batch of the dataset with every modality (and text-only) through the real pipeline
    processor = AutoProcessor.from_pretrained(hf_dir)
    ds = build_train_dataset(load_data_config(data_json), processor, SEQ)
    assert len(ds) == len(samples)
    # the 10 steps (shuffled, seed 7) include steps where one rank has media the other lacks, so the
    # encoders' dummy inputs keep the FSDP collectives in line
    kinds = [{k for k in ("images", "videos", "audios") if k in smp} for smp in samples]
    steps = list(zip(*(itertools.islice(iter(MicroBatchSampler(len(ds), 1, 2, r, 2, shuffle=True, seed=7)), 10)
                       for r in (0, 1))))
    pairs = [(kinds[a[0]], kinds[b[0]]) for a, b in steps]
    assert any(bool(x) != bool(y) for x, y in pairs), pairs                       # text-only vs media
    if name in OMNI:
        assert any(("audios" in x) != ("audios" in y) for x, y in pairs), pairs  # audio vs none
    items = [ds[i] for i in range(len(ds))]
    batch = Collator(processor.tokenizer.pad_token_id, use_audio_in_video=aiv)(items)
    need = {"pixel_values", "pixel_values_videos"} | ({"input_features"} if name in OMNI else set())
    assert need <= set(batch), sorted(batch)
    assert batch.get("use_audio_in_video", False) == aiv

    ours = load_hf_model(fam, None, AutoConfig.from_pretrained(hf_dir), init_weights=False)
    load_model_weights_from_dcp(resolve_checkpoint(straight), ours)
    ours.eval()
    # the resumed run's iteration 10 holds the very same weights as the straight run's
    resumed = load_hf_model(fam, None, AutoConfig.from_pretrained(hf_dir), init_weights=False)
    load_model_weights_from_dcp(resolve_checkpoint(stopped), resumed)
    mine, theirs = ours.state_dict(), resumed.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    del resumed, theirs
    media = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "input_features",
             "feature_attention_mask")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", *media, *fam.forward_batch_keys) if k in batch}
    with torch.no_grad():
        hidden, _ = fam.forward_hidden(ours, batch)          # omnitune's training forward
        a = fam.lm_head(ours)(hidden)
        b = plain(**inputs).logits                           # plain transformers on the export
        assert (a - b).abs().max().item() < 1e-5
        # the export holds the trained weights, not the original ones
        orig_full = fam.folder_class().from_pretrained(hf_dir, dtype=torch.float32).eval()
        orig = getattr(orig_full, "thinker", orig_full) if fam.folder_prefix else orig_full
        assert (orig(**inputs).logits - b).abs().max().item() > 1e-3

    if fam.folder_prefix:
        # FULL Omni folder: everything outside the thinker (talker, token2wav / code2wav) untouched,
        # on disk and as loaded by transformers
        src, dst = _tensors(hf_dir), _tensors(out)
        assert sorted(src) == sorted(dst)
        rest = [k for k in src if not k.startswith(fam.folder_prefix)]
        assert any(k.startswith("talker.") for k in rest)
        assert any(k.startswith(("token2wav.", "code2wav.")) for k in rest)
        assert all(torch.equal(src[k], dst[k]) for k in rest)
        loaded, original = plain_full.state_dict(), orig_full.state_dict()
        outside = [k for k in loaded if not k.startswith(fam.folder_prefix)]
        assert outside and all(torch.equal(loaded[k], original[k]) for k in outside)
        # never-used thinker parameters (Qwen2.5-Omni audio_bos_eos_token) are exported as they were
        unused = [n for n, p in ours.named_parameters() if any(p is u for u in fam.unused_parameters(ours))]
        assert len(unused) == (1 if name == "qwen2_5_omni" else 0)
        for n in unused:
            assert torch.equal(loaded[fam.folder_prefix + n], original[fam.folder_prefix + n]), n
        for extra in (*fam.folder_extra_files, "config.json"):
            assert (out / extra).read_bytes() == (hf_dir / extra).read_bytes(), extra
    lap("checks")
    print(f"{name}: {times} losses {[round(ref[i], 3) for i in range(1, 11)]}")
