"""Parallel layouts: ParallelDims' groups, and every bad layout refused before launch, naming the flag
and the fix (make_plan is what `omnitune train` and `--dry-run` run before any process starts)."""
from __future__ import annotations

import time

import pytest

from omnitune.config.errors import ConfigError
from omnitune.parallel.dims import ParallelDims
from omnitune.train.trainer import make_plan


def test_groups_and_coordinates():
    d = ParallelDims(world=8, tp=2, cp=2)
    assert d.dp == 2 and d.dp_cp == 4
    assert d.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.groups("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert d.coords(5) == {"pp": 0, "dp": 1, "cp": 0, "tp": 1}
    e = ParallelDims(world=8, ep=4)
    assert e.groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # every rank is in exactly one group of each dimension
    for dim in ("tp", "cp", "dp", "dp_cp"):
        assert sorted(r for g in d.groups(dim) for r in g) == list(range(8))


def _argv(data_json, model_json, *extra):
    return ["--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "1",
            "--micro-batch-size", "1", *extra]


@pytest.fixture(scope="module")
def configs(tiny_model_dir, tmp_path_factory):
    from spine_util import write_configs

    out = {}
    for fam in ("qwen2_vl", "qwen3_vl_moe", "qwen2_5_omni"):
        out[fam] = write_configs(tmp_path_factory.mktemp(fam), tiny_model_dir(fam), family=fam)
    return out


# (family, world, flags, words the message must contain): the tiny models have 4 heads, 2 kv heads,
# 4 vision/audio heads, vocab 151936, 4 experts (MoE)
BAD = [
    ("qwen2_vl", 4, ["--tensor-model-parallel-size", "3"], ["world size 4", "--tensor-model-parallel-size 3"]),
    ("qwen2_vl", 8, ["--tensor-model-parallel-size", "4"], ["--tensor-model-parallel-size 4", "key/value heads"]),
    ("qwen2_vl", 8, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "4"],
     ["--context-parallel-size 4", "4 attention heads"]),
    ("qwen2_vl", 2, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"],
     ["--context-parallel-algo megatron_cp_algo", "ulysses_cp_algo"]),
    ("qwen2_vl", 2, ["--expert-model-parallel-size", "2"], ["--expert-model-parallel-size 2", "no MoE experts"]),
    ("qwen3_vl_moe", 3, ["--expert-model-parallel-size", "3"], ["4 experts", "divisible"]),
    ("qwen3_vl_moe", 4, ["--expert-model-parallel-size", "4", "--tensor-model-parallel-size", "2"],
     ["--expert-model-parallel-size 4", "must divide"]),
    ("qwen3_vl_moe", 4, ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"],
     ["--tensor-model-parallel-size 2", "experts are not tensor-parallel"]),
    ("qwen2_vl", 4, ["--tensor-model-parallel-size", "2", "--global-batch-size", "3"],
     ["--global-batch-size 3", "data-parallel size 2"]),
    ("qwen2_vl", 2, ["--pipeline-model-parallel-size", "2"], ["--pipeline-model-parallel-size 2", "at least 2"]),
    ("qwen2_vl", 4, ["--pipeline-model-parallel-size", "2", "--context-parallel-size", "2", "--global-batch-size", "4"],
     ["--pipeline-model-parallel-size 2", "--context-parallel-size", "not implemented"]),
    ("qwen2_vl", 2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
                     "--global-batch-size", "3"], ["interleaved 1F1B", "multiple of --pipeline-model-parallel-size 2"]),
    ("qwen2_vl", 2, ["--context-parallel-size", "2", "--seq-length", "1"], ["--seq-length 1", "--context-parallel-size 2"]),
    ("qwen2_5_omni", 8, ["--tensor-model-parallel-size", "8"], ["--tensor-model-parallel-size 8", "heads"]),
]


@pytest.mark.parametrize("family,world,flags,words", BAD, ids=[f"{b[0]}-{b[1]}-{'_'.join(b[2][::2])}" for b in BAD])
def test_bad_layout_refused_before_launch(configs, family, world, flags, words):
    data_json, model_json = configs[family]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        make_plan(_argv(data_json, model_json, *flags), world_size=world)
    assert time.perf_counter() - t0 < 30
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_good_layout_plan_and_estimate(configs):
    data_json, model_json = configs["qwen2_vl"]
    one, _ = make_plan(_argv(data_json, model_json), world_size=1)
    tp2, _ = make_plan(_argv(data_json, model_json, "--tensor-model-parallel-size", "2",
                             "--global-batch-size", "4"), world_size=4)
    assert tp2.dims.dp == 2 and tp2.grad_acc == 2
    text = tp2.describe()
    assert "world 4 = PP 1 x DP 2 x CP 1 x TP 2" in text
    assert "tp groups : [0,1] [2,3]" in text and "dp groups : [0,2] [1,3]" in text
    assert "memory     : per rank" in text
    from omnitune.parallel.estimate import estimate_rank_bytes

    e1 = estimate_rank_bytes(one.family, one.hf_config, one.dims, set())
    e4 = estimate_rank_bytes(tp2.family, tp2.hf_config, tp2.dims, set())
    assert e1.params == e1.total_params
    # TP2 x DP2: every sharded weight is split 4 ways; only the few replicated (norms, biases) less
    assert e1.params / 4 <= e4.params < e1.params / 3.5
    assert e4.bytes_total == 16 * e4.trainable + 4 * (e4.params - e4.trainable)


def _with_layers(model_json, tmp_path, text=None, vision=None, freeze_text=False):
    import json

    cfg = json.loads(model_json.read_text())
    if text is not None:
        cfg.setdefault("text_decoder", {})["pipeline_num_layers"] = text
    cfg.setdefault("text_decoder", {})["freeze"] = freeze_text
    if vision is not None:
        cfg["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = vision
    out = tmp_path / "model_pp.json"
    out.write_text(json.dumps(cfg))
    return out


PP_BAD = [   # (text layers, vision layers, flags, words): the tiny Qwen2-VL has 2 text and 2 vision layers
    ([1, 1], [1, 1], [], ["image_encoder.vision_encoder.pipeline_num_layers [1, 1]",
                          "encoder's layers must all come before", "use [2, 0]"]),
    ([0, 2], [1, 1], [], ["vision_encoder.pipeline_num_layers [1, 1]", "whole encoder on the first stage"]),
    ([1, 1, 0], None, [], ["text_decoder.pipeline_num_layers [1, 1, 0] has 3 entries", "2 stages"]),
    ([2, 1], None, [], ["sums to 3", "2 layers"]),
    ([1, 1], None, ["--virtual-pipeline-model-parallel-size", "2"], ["give a list of 2 lists"]),
    ([[1, 1], [0]], None, ["--virtual-pipeline-model-parallel-size", "2"], ["2 lists of 2 numbers"]),
]


@pytest.mark.parametrize("text,vision,flags,words", PP_BAD, ids=[str(i) for i in range(len(PP_BAD))])
def test_bad_pipeline_layout_refused_naming_the_field(configs, tmp_path, text, vision, flags, words):
    data_json, model_json = configs["qwen2_vl"]
    mj = _with_layers(model_json, tmp_path, text, vision)
    with pytest.raises(ConfigError) as e:
        make_plan(_argv(data_json, mj, "--pipeline-model-parallel-size", "2", "--global-batch-size", "4", *flags),
                  world_size=2)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_pipeline_stage_map_and_dummy_optimizer_rule(configs, tmp_path):
    data_json, model_json = configs["qwen2_vl"]
    pp = ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4"]
    plan, _ = make_plan(_argv(data_json, _with_layers(model_json, tmp_path, [[0, 1], [1, 0]], [[2, 0], [0, 0]]),
                              *pp, "--virtual-pipeline-model-parallel-size", "2"), world_size=2)
    text = plan.describe()
    assert "pipeline   : 4 stages, interleaved 1F1B, 2 chunks per PP rank, 4 micro-batches per step" in text
    assert "stage 0 (PP rank 0, chunk 0): vision/audio encoders + embedding, no text layer" in text
    assert "stage 1 (PP rank 1, chunk 0): text layers 0-0" in text
    assert "stage 2 (PP rank 0, chunk 1): text layers 1-1" in text
    assert "stage 3 (PP rank 1, chunk 1): no text layer, norm + lm_head + loss" in text
    # the tied embedding / lm_head is trainable on both the first and the last stage
    counts = [int(line.rsplit("; ", 1)[1].split()[0].replace(",", "")) for line in text.splitlines()
              if line.strip().startswith("stage ")]
    assert all(c > 0 for c in counts) and counts[3] < counts[0]
    frozen = _with_layers(model_json, tmp_path, [1, 1], freeze_text=True)
    with pytest.raises(ConfigError) as e:
        make_plan(_argv(data_json, frozen, *pp), world_size=2)
    assert "pipeline stage(s) 1 hold no trainable parameter" in str(e.value)
    assert "--enable-dummy-optimizer" in str(e.value)
    plan, _ = make_plan(_argv(data_json, frozen, *pp, "--enable-dummy-optimizer"), world_size=2)
    assert "stage 1 (PP rank 1, chunk 0): text layers 1-1, norm + lm_head + loss; 0 trainable" in plan.describe()


def _with_hetero(model_json, tmp_path, **sizes):
    """model.json with ``image_encoder`` / ``audio_encoder`` sizes, e.g. image_encoder={"tp": 1}."""
    import json

    cfg = json.loads(model_json.read_text())
    for section, values in sizes.items():
        cfg.setdefault(section, {}).update(values)
    out = tmp_path / "model_hetero.json"
    out.write_text(json.dumps(cfg))
    return out


HETERO_BAD = [   # (model.json sizes, flags, world, words): tiny Omni, 4 heads, 2 kv heads
    ({"image_encoder": {"tp": 1}}, ["--micro-batch-size", "3"], 2,
     ["--micro-batch-size 3", "multiple of --tensor-model-parallel-size 2", "e.g. --micro-batch-size 2"]),
    ({"image_encoder": {"tp": 4}}, [], 2, ["image_encoder.tp = 4", "set image_encoder.tp to 1 or 2"]),
    ({"audio_encoder": {"pp": 2}}, [], 2, ["audio_encoder.pp = 2", "set audio_encoder.pp to 1"]),
    ({"image_encoder": {"cp": 2}}, [], 2, ["image_encoder.cp = 2", "to 1"]),
    ({}, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "1"], 2,
     ["--hetero-parallel: not with --context-parallel-size > 1"]),
    ({}, ["--lora-target-modules", "linear_qkv", "--tensor-model-parallel-size", "1"], 1,
     ["--hetero-parallel: not with --lora-target-modules"]),
]


@pytest.mark.parametrize("sizes,flags,world,words", HETERO_BAD, ids=[str(i) for i in range(len(HETERO_BAD))])
def test_bad_hetero_layout_refused_naming_the_field(configs, tmp_path, sizes, flags, world, words):
    data_json, model_json = configs["qwen2_5_omni"]
    mj = _with_hetero(model_json, tmp_path, **sizes)
    argv = _argv(data_json, mj, "--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--hetero-parallel",
                 *flags)
    with pytest.raises(ConfigError) as e:
        make_plan(argv, world_size=world)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_hetero_plan_report_and_estimate(configs, tmp_path):
    """TP2 with both Omni encoders data-parallel: reported in --dry-run, and the memory estimate
    shards them over DP x TP instead of splitting them by TP; without the flag the sizes are a note."""
    data_json, model_json = configs["qwen2_5_omni"]
    mj = _with_hetero(model_json, tmp_path, image_encoder={"tp": 1, "pp": 1, "cp": 1}, audio_encoder={"tp": 1})
    tp2 = ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4"]
    plan, _ = make_plan(_argv(data_json, mj, *tp2, "--hetero-parallel"), world_size=4)
    assert plan.dims.hetero_dp == ("image_encoder", "audio_encoder")
    text = plan.describe()
    assert ("hetero     : image_encoder, audio_encoder data-parallel over each TP group (2 ranks share a "
            "micro-batch's items), FSDP2 over DP x CP x TP = 4; the LLM is TP 2") in text
    plain, _ = make_plan(_argv(data_json, mj, *tp2), world_size=4)
    assert plain.dims.hetero_dp == ()
    assert ("hetero     : off; image_encoder.tp 1, audio_encoder.tp 1 in " in plain.describe()
            and "apply with --hetero-parallel only" in plain.describe())
    from omnitune.parallel.estimate import estimate_rank_bytes

    e_h = estimate_rank_bytes(plan.family, plan.hf_config, plan.dims, set())
    e_p = estimate_rank_bytes(plain.family, plain.hf_config, plain.dims, set())
    # an encoder weight is whole on 4 FSDP ranks (1/4 each) instead of TP2-split over DP2 (1/4 each):
    # the same bytes, except the encoder's replicated small tensors (norms, biases) are now sharded too
    assert e_h.total_params == e_p.total_params and e_h.params <= e_p.params
    # tp 2 (= the LLM's) is TP as without the flag
    same = _with_hetero(model_json, tmp_path, image_encoder={"tp": 2}, audio_encoder={"tp": 2})
    plan2, _ = make_plan(_argv(data_json, same, *tp2, "--hetero-parallel"), world_size=4)
    assert plan2.dims.hetero_dp == () and "every encoder follows --tensor-model-parallel-size 2" in plan2.describe()


def test_pipeline_eval_interval_refused_only_with_a_validation_set(configs, tmp_path):
    """The seed scripts pass --eval-interval without any validation data (a no-op): that parses under
    PP; with data.json val_rate the validation run (not verified under PP) is refused naming both."""
    import json

    data_json, model_json = configs["qwen2_vl"]
    flags = ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4", "--eval-interval", "2"]
    plan, _ = make_plan(_argv(data_json, model_json, *flags), world_size=2)
    assert plan.dims.pp == 2
    cfg = json.loads(data_json.read_text())
    cfg["dataset_param"]["basic_parameters"]["val_rate"] = 0.25
    with_val = tmp_path / "data_val.json"
    with_val.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        make_plan(_argv(with_val, model_json, *flags), world_size=2)
    assert "--pipeline-model-parallel-size 2: not with --eval-interval with a validation set" in str(e.value)
    assert "val_rate" in str(e.value)
