"""2-process FSDP2 training (torchrun through `omnitune train`) on mixed image / video / text-only
data with the tiny Qwen2-VL: micro-batches of one sample, so in a step one rank may hold a video
while the other holds text only. It must not hang and the loss must fall."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from media_util import MLLM_ATTR, jpeg, mp4

from omnitune.models.tiny import build_tiny_model
from spine_util import losses, omnitune, train_flags, write_configs


@pytest.mark.slow
def test_two_process_fsdp_on_image_video_text_mix(tmp_path):
    hf_dir = build_tiny_model("qwen2_vl", tmp_path / "tiny_qwen2vl")
    data = tmp_path / "data"
    data.mkdir()
    images = [jpeg(data / f"i{k}.jpg", (56 + 14 * k, 56), seed=k) for k in range(3)]
    videos = [mp4(data / f"v{k}.mp4", 12 + 4 * k, 8, (56, 56), seed=k) for k in range(3)]
    samples = []
    for k in range(12):
        kind = k % 3
        if kind == 0:
            samples.append({"messages": [{"role": "user", "content": f"<image>Which picture is this? ({k})"},
                                         {"role": "assistant", "content": f"Picture number {k % 3}."}],
                            "images": [images[k % 3]]})
        elif kind == 1:
            samples.append({"messages": [{"role": "user", "content": f"<video>How long is the clip? ({k})"},
                                         {"role": "assistant", "content": f"Clip {k % 3} is short."}],
                            "videos": [videos[k % 3]]})
        else:
            samples.append({"messages": [{"role": "user", "content": f"Count to {k}."},
                                         {"role": "assistant", "content": " ".join(str(i) for i in range(k))}]})
    (data / "mix.json").write_text(json.dumps(samples))
    data_json, model_json = write_configs(tmp_path / "cfg", hf_dir)
    cfg = json.loads(data_json.read_text())
    dp = cfg["dataset_param"]
    dp["preprocess_parameters"].update(video_min_pixels=28 * 28, video_max_pixels=56 * 56, video_fps=2.0)
    dp["basic_parameters"].update(dataset_dir=str(data), dataset=str(data / "mix.json"))
    dp["attr"] = MLLM_ATTR
    data_json.write_text(json.dumps(cfg))
    save = tmp_path / "save"
    r = omnitune(["train", "--nproc-per-node", "2",
                  *train_flags(data_json, model_json, iters=24, save=save, load=hf_dir, mbs=1, gbs=2,
                              extra=["--lr", "5e-3", "--min-lr", "5e-4"])],
                 timeout=900)
    loss = losses(save)
    assert sorted(loss) == list(range(1, 25)), r.stdout[-2000:]
    first, last = sum(loss[i] for i in range(1, 5)) / 4, sum(loss[i] for i in range(21, 25)) / 4
    assert last < 0.6 * first, loss
