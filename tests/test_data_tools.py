"""Dataset converters: llava-to-mllm run as the seed guides run it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from media_util import MLLM_ATTR, jpeg, mp4, sampled, wav, write_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "qwen2vl" / "llava_instruct_2_mllm_demo_format.py"


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_llava_to_mllm_like_the_seed(tmp_path):
    imgs = tmp_path / "data" / "COCO2017" / "train2017"
    imgs.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(imgs / "000001.jpg")
    items = [
        {"id": "a", "image": "000001.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "gpt", "value": "A box."}]},
        {"id": "b", "image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>x"},
                                                               {"from": "gpt", "value": "y"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "data" / "llava_instruct_150k.json").write_text(json.dumps(items))
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 2 samples (1 text-only); skipped 1 whose image file is missing" in r.stdout
    assert "missing.jpg" in r.stdout
    out = json.loads((tmp_path / "data" / "mllm_format_llava_instruct_data.json").read_text())
    assert out == [
        {"images": ["./data/COCO2017/train2017/000001.jpg"],
         "messages": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A box."}]},
        {"images": [], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    # an existing output is not overwritten silently
    r = run(tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
    # an unknown role names the item, and nothing is written
    items[0]["conversations"][1]["from"] = "bot"
    (tmp_path / "data" / "llava_instruct_150k.json").write_text(json.dumps(items))
    r = run(tmp_path, "--output", "./data/other.json")
    assert r.returncode == 2 and "item 0 (id 'a'): turn 1 has unknown role 'bot'" in r.stderr
    assert not (tmp_path / "data" / "other.json").exists()


def test_converted_llava_data_loads_with_seed_style_data_json(tmp_path, monkeypatch, tiny_qwen2vl):
    from transformers import AutoProcessor

    from omnitune.config.data import load_data_config
    from omnitune.data import build_train_dataset

    test_llava_to_mllm_like_the_seed(tmp_path)
    cfg = {"dataset_param": {"preprocess_parameters": {"model_name_or_path": str(tiny_qwen2vl)},
                             "basic_parameters": {"template": "qwen2vl", "dataset_dir": "./data",
                                                  "dataset": "./data/mllm_format_llava_instruct_data.json"},
                             "attr": {"images": "images", "messages": "messages", "role_tag": "role",
                                      "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}
    (tmp_path / "data.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    ds = build_train_dataset(load_data_config("data.json"), AutoProcessor.from_pretrained(tiny_qwen2vl), 1024)
    assert len(ds) == 2
    assert sum("pixel_values" in ds[i] for i in range(2)) == 1


def test_rlhfv_to_dpo_from_parquet_with_skip_report(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    good = {"bytes": buf.getvalue(), "path": None}
    rows = [
        {"conversations": [{"from": "human", "value": "<image>Describe."}], "chosen": {"from": "gpt", "value": "Red."},
         "rejected": {"from": "gpt", "value": "Blue."}, "images": [good]},
        {"conversations": [{"from": "human", "value": "<image>Describe."}], "chosen": {"from": "gpt", "value": "A."},
         "rejected": {"from": "gpt", "value": "B."}, "images": [{"bytes": b"garbage", "path": None}]},
        {"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "gpt", "value": "A."},
         "rejected": {"from": "gpt", "value": "B."}, "images": []},
    ]
    folder = tmp_path / "data" / "datasets" / "rlhf-v" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    script = REPO / "examples" / "qwen2vl" / "rlhfv_2_sharegpt_demo_format.py"
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 1 pairs; skipped 2" in r.stdout
    assert "item 1: image cannot be decoded" in r.stdout and "item 2: missing or empty images" in r.stdout
    out = json.loads((tmp_path / "data" / "rlhf-v.json").read_text())
    assert out == [{"messages": [{"role": "user", "content": "<image>Describe."}],
                    "chosen": {"role": "assistant", "content": "Red."},
                    "rejected": {"role": "assistant", "content": "Blue."},
                    "images": ["data/rlhf_v_images/res/0000.jpg"]}]
    assert (tmp_path / "data/rlhf_v_images/res/0000.jpg").read_bytes() == good["bytes"]


def test_inspect_counts_and_marks_trained_tokens(tmp_path, tiny_qwen2vl):
    from omnitune.cli.demo import demo_configs

    data_json, _ = demo_configs(tmp_path, tiny_qwen2vl)
    r = subprocess.run([sys.executable, "-m", "omnitune.cli.main", "data", "inspect", "--mm-data", str(data_json),
                        "--index", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "samples        : 48 (32 with images, 16 text-only); 48 read, 0 dropped" in r.stdout
    assert "images         : 32" in r.stdout
    assert "(built now)" in r.stdout  # demo_configs sets cache_dir
    assert "  image 0: " in r.stdout.split("--- sample 0", 1)[1]  # sample 0 has an image
    sample = r.stdout.split("--- sequence (", 1)[1].split("\n", 1)[1]
    assert sample.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert sample.rstrip().endswith("<|im_end|>\n]]")
    r = subprocess.run([sys.executable, "-m", "omnitune.cli.main", "data", "inspect", "--mm-data", str(data_json),
                        "--index", "99"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--index 99: the dataset has 48 samples" in r.stderr
    assert "(reused)" not in r.stderr and "Traceback" not in r.stderr


def _unfold(text: str) -> str:
    """Undo render_sample's marks: [[...]] removed, <tok>xN expanded."""
    text = re.sub(r"(<\|[A-Za-z_]+\|>)x(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    return text.replace("[[", "").replace("]]", "")


def test_inspect_omni_image_video_audio_counts_skips_and_cache(tmp_path, tiny_model_dir):
    """Qwen2.5-Omni with an image, a video with its sound track (use_audio_in_video) and an audio;
    one sample truncated, one dropped for media past the limit, one dropped with no trained token."""
    from transformers import AutoProcessor

    from omnitune.data.tools.inspect import inspect_data

    hf = tiny_model_dir("qwen2_5_omni")
    jpeg(tmp_path / "a.jpg")
    mp4(tmp_path / "v.mp4", n_frames=20, fps=10, audio_rate=16000)
    wav(tmp_path / "s.wav", seconds=1.5)
    long = " word" * 300
    samples = [
        {"messages": [{"role": "user", "content": "<image><video><audio>What is it?"},
                      {"role": "assistant", "content": "A cat, 猫."}],
         "images": ["a.jpg"], "videos": ["v.mp4"], "audios": ["s.wav"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Long" + long}]},
        {"messages": [{"role": "user", "content": long + "<image>"}, {"role": "assistant", "content": "x"}],
         "images": ["a.jpg"]},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "x"}]},
    ]
    data_json = write_config(tmp_path, samples, template="qwen2_omni",
                             pre={"model_name_or_path": str(hf), "use_audio_in_video": True},
                             basic={"cutoff_len": 200, "cache_dir": str(tmp_path / "cache")})
    out = inspect_data(str(data_json), index=0)
    lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in out.splitlines()[:13] if ":" in ln}
    assert lines["samples"] == "3 (1 with images, 1 with videos, 1 with audios, 2 text-only); 5 read, 2 dropped"
    assert lines["truncated"].startswith("1 ")
    assert lines["dropped"] == "1 (media would be cut at the limit), 1 (no trained token)"
    assert "limit 200" in lines["tokens"]
    _, idx, _, _, _ = sampled(tmp_path / "v.mp4", 2.0)
    assert lines["videos"].startswith(f"1 ({len(idx)} frames sampled at video_fps 2.0")
    assert lines["audios"] == "1 (1.5 s at 16000 Hz)"
    assert lines["video audio"].startswith("1 track (")
    assert "(built now)" in lines["build"]

    # the rendered sample: media pads folded to what the HF processors give at item time
    from omnitune.config.data import load_data_config
    from omnitune.data.dataset import SFTDataset
    proc = AutoProcessor.from_pretrained(hf)
    ds = SFTDataset(load_data_config(data_json), proc, 200)
    item = ds[0]
    merge = proc.image_processor.merge_size
    n_image = int(item["image_grid_thw"].prod()) // merge ** 2
    n_video = int(item["video_grid_thw"].prod()) // merge ** 2
    n_audio = int((item["mm_token_type_ids"] == 3).sum())
    assert n_audio > 0 and lines["media tokens"].startswith(f"image {n_image}, video {n_video}, audio {n_audio}")
    rendered = out.split("--- sequence (", 1)[1].split("\n", 1)[1]
    assert f"<|vision_bos|><|IMAGE|>x{n_image}<|vision_eos|>" in rendered
    assert "<|VIDEO|>x" in rendered and "<|AUDIO|>x" in rendered
    assert rendered.rstrip().endswith("<|im_start|>assistant\n[[A cat, 猫.<|im_end|>\n]]")
    assert _unfold(rendered) == proc.tokenizer.decode(item["input_ids"].tolist())
    assert sum(int(m) for m in re.findall(r"<\|AUDIO\|>x(\d+)", rendered)) == n_audio

    # second run: the cache entry is reused; a changed image invalidates it
    assert "(reused)" in inspect_data(str(data_json), index=0).splitlines()[1]
    jpeg(tmp_path / "a.jpg", seed=1)
    assert "(built now)" in inspect_data(str(data_json), index=1).splitlines()[1]


def test_inspect_qwen3_vl_preference_pairs_show_chosen_and_rejected(tmp_path, tiny_model_dir):
    from omnitune.data.tools.inspect import inspect_data

    hf = tiny_model_dir("qwen3_vl")
    mp4(tmp_path / "v.mp4", n_frames=20, fps=10)
    jpeg(tmp_path / "a.jpg")
    pairs = [{"messages": [{"role": "user", "content": "<video>What moves?"}],
              "chosen": {"role": "assistant", "content": "Bars."},
              "rejected": {"role": "assistant", "content": "Dogs."}, "videos": ["v.mp4"]},
             {"messages": [{"role": "user", "content": "<image>Colour?"}],
              "chosen": "Noise.", "rejected": "Red.", "images": ["a.jpg"]}]
    data_json = write_config(tmp_path, pairs, template="qwen3_vl_nothink", pre={"model_name_or_path": str(hf)},
                             basic={"val_rate": 0.5, "val_dataset": "d.json"},
                             attr={**MLLM_ATTR, "ranking": True, "chosen": "chosen", "rejected": "rejected"})
    out = inspect_data(str(data_json), index=0)
    # settings the trainer would refuse are shown, the data is still inspected
    assert "trainer refuses: basic_parameters.val_dataset and val_rate are both set; use one of them" in out
    assert "samples        : 2 preference pairs (1 with images, 1 with videos, 0 text-only); 2 read, 0 dropped" in out
    assert "cache off" in out
    chosen = out.split("--- chosen", 1)[1].split("--- rejected", 1)[0]
    rejected = out.split("--- rejected", 1)[1]
    assert chosen.rstrip().endswith("<|im_start|>assistant\n[[Bars.<|im_end|>\n]]")
    assert rejected.rstrip().endswith("<|im_start|>assistant\n[[Dogs.<|im_end|>\n]]")
    # Qwen3-VL video: one timestamped block per temporal grid step, at the sampled frames' mean times
    _, idx, fps, _, _ = sampled(tmp_path / "v.mp4", 2.0)
    stamps = [(idx[k] / fps + idx[k + 1] / fps) / 2 for k in range(0, len(idx), 2)]
    blocks = re.findall(r"<([0-9.]+) seconds><\|vision_start\|><\|video_pad\|>x(\d+)<\|vision_end\|>", chosen)
    assert [float(s) for s, _ in blocks] == [round(s, 1) for s in stamps]
    assert len({n for _, n in blocks}) == 1
    assert chosen.split("\n", 1)[1].split("[[")[0] == rejected.split("\n", 1)[1].split("[[")[0]  # same prompt
    assert "<think>" not in chosen  # the nothink template
    assert "--index 2: the dataset has 2 samples" in str(pytest.raises(ValueError, inspect_data, str(data_json),
                                                                          index=2).value)


def test_dry_run_plan_describes_the_data_settings(tmp_path, tiny_qwen2vl):
    from spine_util import omnitune, train_flags, write_configs

    data_json, model_json = write_configs(tmp_path, tiny_qwen2vl)
    flags = train_flags(data_json, model_json, iters=2, save=tmp_path / "s", load=tiny_qwen2vl)
    r = omnitune(["train", *flags, "--num-workers", "1", "--dry-run"])
    assert f"data build : map-style, cache_dir {tmp_path / 'cache'}, preprocessing_num_workers 1" in r.stdout
    assert "dataloader : num_workers 1 (--num-workers), shuffle True, drop_last True" in r.stdout
    assert "media      : columns images=images; use_audio_in_video False" in r.stdout
    assert "world 1 = PP 1 x DP 1 x CP 1 x TP 1" in r.stdout  # the other lines stay
    d = json.loads(data_json.read_text())
    bp = d["dataset_param"]["basic_parameters"]
    bp.update(streaming=True, preprocessing_num_workers=2)
    d["dataset_param"]["attr"]["videos"] = "videos"
    d["dataloader_param"].update(num_workers=2, shuffle=False)
    data_json.write_text(json.dumps(d))
    r = omnitune(["train", *flags, "--num-workers", "1", "--dry-run"])
    assert ("data build : streaming (read lazily, sharded by data-parallel rank, position saved in checkpoints); "
            f"cache_dir {tmp_path / 'cache'}: unused") in r.stdout
    assert "dataloader : num_workers 2 (data.json), shuffle False, drop_last True" in r.stdout
    assert "media      : columns images=images, videos=videos; use_audio_in_video False" in r.stdout


def test_readme_models_table_matches_the_registry():
    """The README's Models table names each family's model_id, trained HF class and template."""
    from omnitune.models.registry import FAMILIES, get_family

    readme = (REPO / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `qwen")}
    assert set(rows) == set(FAMILIES)
    for name in FAMILIES:
        fam, row = get_family(name), rows[name]
        assert f"`{fam.model_ids[0]}`" in row and f"`{fam.hf_class_name}`" in row and f"`{fam.template}`" in row, row
