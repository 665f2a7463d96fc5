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
    ("qwen2_vl", 2, ["--pipeline-model-parallel-size", "2"], ["--pipeline-model-parallel-size 2", "not implemented"]),
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
