"""Dataset converters: llava-to-mllm run as the seed guides run it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

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
    assert "samples        : 48 (32 with images, 16 text-only)" in r.stdout
    assert "images         : 32" in r.stdout
    sample = r.stdout.split("trained tokens in [[...]]\n", 1)[1]
    assert sample.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert sample.rstrip().endswith("<|im_end|>\n]]")
    r = subprocess.run([sys.executable, "-m", "omnitune.cli.main", "data", "inspect", "--mm-data", str(data_json),
                        "--index", "99"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--index 99: the dataset has 48 samples" in r.stderr
