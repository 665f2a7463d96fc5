"""mm-convert (Qwen2-VL): round trips, on-disk layout, TP semantics and refused layouts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnitune.cli.mm_convert import main as mm_convert
from omnitune.convert import layout as L
from omnitune.convert.qwen2vl import HfToMmConfig, MmToHfConfig, Qwen2VLConverter, ResplitConfig

CONV = "Qwen2VLConverter"


# ------------------------------------------------------------------ fixtures / helpers
@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    """4 LLM layers, 4 vision blocks, small untied vocab (lm_head stored), plus non-weight files."""
    from omnitune.models.qwen2_vl.spec import SPEC

    d = tmp_path_factory.mktemp("models") / "tiny4"
    c = SPEC.tiny_config("tiny")
    t = c.text_config
    t.num_hidden_layers, t.layer_types = 4, ["full_attention"] * 4
    t.vocab_size, t.pad_token_id, t.bos_token_id, t.eos_token_id = 512, 0, 1, 2
    t.tie_word_embeddings = c.tie_word_embeddings = False
    c.vision_config.depth = 4
    torch.manual_seed(1)
    SPEC.model_class()(c).save_pretrained(d)
    (d / "README.md").write_text("tiny4\n")
    (d / "sub").mkdir()
    (d / "sub" / "note.txt").write_text("kept\n")
    return d


def hf_to_mm(hf, mm, llm, vit, tp=1, **extra):
    par = dict(llm_pp_layers=llm, vit_pp_layers=vit, tp_size=tp, **extra)
    Qwen2VLConverter.hf_to_mm(HfToMmConfig(mm_dir=mm, hf_config={"hf_dir": hf}, parallel_config=par))


def mm_to_hf(hf, mm, out, llm, vit, tp=1, **extra):
    par = dict(llm_pp_layers=llm, vit_pp_layers=vit, tp_size=tp, **extra)
    Qwen2VLConverter.mm_to_hf(MmToHfConfig(mm_dir=mm, hf_config={"hf_dir": hf}, save_hf_dir=out,
                                           parallel_config=par))


def assert_same_weights(a: Path, b: Path):
    for f in sorted(a.glob("*.safetensors")):
        x, y = load_file(f), load_file(b / f.name)
        assert set(x) == set(y), f.name
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            assert torch.equal(x[k], y[k]), k
    assert sorted(p.name for p in a.glob("*.safetensors")) == sorted(p.name for p in b.glob("*.safetensors"))


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("llm,vit,tp", [
    ([[2]], [[2]], 1),
    ([[2]], [[2]], 2),
    ([[1, 1]], [[2, 0]], 2),     # tied embeddings with PP > 1
    ([[0, 2]], [[2, 0]], 1),     # LLM starts on the second stage
])
def test_round_trip_tiny(tiny_qwen2vl, tmp_path, llm, vit, tp):
    mm, out = tmp_path / "mm", tmp_path / "hf"
    hf_to_mm(tiny_qwen2vl, mm, llm, vit, tp)
    mm_to_hf(tiny_qwen2vl, mm, out, [x for c in llm for x in c], [x for c in vit for x in c], tp)
    assert_same_weights(tiny_qwen2vl, out)
    for f in tiny_qwen2vl.iterdir():
        if f.suffix != ".safetensors":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("llm,vit,tp", [
    ([[1, 1, 1, 1]], [[4, 0, 0, 0]], 2),
    ([[0, 2, 2]], [[3, 1, 0]], 1),
    ([[0, 1], [2, 1]], [[3, 1], [0, 0]], 2),      # VPP: 2 chunks x 2 PP ranks
    ([[0, 0], [2, 2]], [[1, 1], [2, 0]], 1),      # VPP with vision in the second chunk
])
def test_round_trip_4_layers(tiny4, tmp_path, llm, vit, tp):
    mm, out = tmp_path / "mm", tmp_path / "hf"
    hf_to_mm(tiny4, mm, llm, vit, tp)
    mm_to_hf(tiny4, mm, out, llm, vit, tp)
    assert_same_weights(tiny4, out)
    assert (out / "README.md").read_text() == "tiny4\n"
    assert (out / "sub" / "note.txt").read_text() == "kept\n"
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny4 / "config.json").read_text())


def test_hetero_vit_tp(tiny4, tmp_path):
    mm, out = tmp_path / "mm", tmp_path / "hf"
    hf_to_mm(tiny4, mm, [[2, 2]], [[4, 0]], tp=2, vit_tp_size=1)
    sd0 = load_pt(mm / "release/mp_rank_00_000/model_optim_rng.pt")["model"]
    sd1 = load_pt(mm / "release/mp_rank_01_000/model_optim_rng.pt")["model"]
    k = "image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(sd0[k], sd1[k]) and sd0[k].shape[0] == 3 * 64  # vision replicated
    mm_to_hf(tiny4, mm, out, [2, 2], [4, 0], tp=2, vit_tp_size=1)
    assert_same_weights(tiny4, out)


@pytest.mark.parametrize("a,b", [
    (dict(llm=[[2]], vit=[[2]], tp=1), dict(llm=[1, 1], vit=[2, 0], tp=2)),
    (dict(llm=[[1, 1]], vit=[[2, 0]], tp=2), dict(llm=[2], vit=[2], tp=1)),
])
def test_resplit_then_hf(tiny_qwen2vl, tmp_path, a, b):
    mm_a, mm_b, out = tmp_path / "a", tmp_path / "b", tmp_path / "hf"
    hf_to_mm(tiny_qwen2vl, mm_a, a["llm"], a["vit"], a["tp"])
    flat_a = {k: [x for c in a[k] for x in c] for k in ("llm", "vit")}
    Qwen2VLConverter.resplit(ResplitConfig(
        source_dir=mm_a, target_dir=mm_b,
        source_parallel_config=dict(llm_pp_layers=flat_a["llm"], vit_pp_layers=flat_a["vit"], tp_size=a["tp"]),
        target_parallel_config=dict(llm_pp_layers=b["llm"], vit_pp_layers=b["vit"], tp_size=b["tp"])))
    if len(b["llm"]) > 1:  # tied, PP > 1: output_layer must exist on the last stage
        last = load_pt(mm_b / f"release/mp_rank_00_{len(b['llm']) - 1:03d}/model_optim_rng.pt")["model"]
        assert "text_decoder.output_layer.weight" in last
    mm_to_hf(tiny_qwen2vl, mm_b, out, b["llm"], b["vit"], b["tp"])
    assert_same_weights(tiny_qwen2vl, out)


# ------------------------------------------------------------------ on-disk layout (through the CLI)
def test_layout_on_disk_via_cli(tiny_qwen2vl, tmp_path):
    mm = tmp_path / "mm"
    r = subprocess.run([sys.executable, "-m", "omnitune.cli.mm_convert", CONV, "hf_to_mm",
                        "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir", str(tiny_qwen2vl),
                        "--cfg.parallel_config.llm_pp_layers", "[[1,1]]",
                        "--cfg.parallel_config.vit_pp_layers", "[[2,0]]",
                        "--cfg.parallel_config.tp_size", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in (mm / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert sorted(p.name for p in mm.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    first = load_pt(mm / "release/mp_rank_01_000/model_optim_rng.pt")
    last = load_pt(mm / "release/mp_rank_01_001/model_optim_rng.pt")
    assert set(first) == {"model", "checkpoint_version"} and first["checkpoint_version"] == 3.0
    f, l = first["model"], last["model"]
    assert "image_encoder.encoder.patch_embed.proj.weight" in f
    assert "image_encoder.projector.encoder.linear_fc1.weight" in f  # vision's last stage is stage 0
    assert "text_decoder.embedding.word_embeddings.weight" in f
    assert "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight" in f
    assert "text_decoder.decoder.layers.1.input_layernorm.weight" not in f
    assert "text_decoder.decoder.layers.0.mlp.linear_fc1.weight" in l  # index restarts per stage
    assert {"text_decoder.decoder.final_layernorm.weight", "text_decoder.output_layer.weight"} <= set(l)
    assert not any(k.startswith("image_encoder") for k in l)
    # tied + PP > 1: output_layer is a copy of word_embeddings (vocab split: rank 1 holds the 2nd half)
    emb = load_file(tiny_qwen2vl / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(l["text_decoder.output_layer.weight"], emb.chunk(2)[1])
    assert torch.equal(f["text_decoder.embedding.word_embeddings.weight"], emb.chunk(2)[1])

    # mm_to_hf through the CLI with the flat lists of the seed
    out = tmp_path / "hf"
    rc = mm_convert([CONV, "mm_to_hf", "--cfg.save_hf_dir", str(out), "--cfg.mm_dir", str(mm),
                     "--cfg.hf_config.hf_dir", str(tiny_qwen2vl), "--cfg.parallel_config.llm_pp_layers", "[1,1]",
                     "--cfg.parallel_config.vit_pp_layers", "[2,0]", "--cfg.parallel_config.tp_size", "2"])
    assert rc == 0
    assert_same_weights(tiny_qwen2vl, out)


def test_layout_pp1_and_vpp(tiny4, tmp_path):
    hf_to_mm(tiny4, tmp_path / "a", [[4]], [[4]], tp=2)
    assert sorted(p.name for p in (tmp_path / "a/release").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    hf_to_mm(tiny4, tmp_path / "b", [[0, 1], [2, 1]], [[3, 1], [0, 0]])
    assert sorted(p.name for p in (tmp_path / "b/release").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    c0 = load_pt(tmp_path / "b/release/mp_rank_00_000/model_optim_rng.pt")
    c1 = load_pt(tmp_path / "b/release/mp_rank_00_001/model_optim_rng.pt")
    assert set(c0) == {"model0", "model1", "checkpoint_version"}
    # stages: 0 = (chunk0, pp0): vit 0-2 ; 1 = (chunk0, pp1): vit 3 + llm 0 ; 2 = (chunk1, pp0): llm 1-2 ; 3: llm 3
    assert "image_encoder.encoder.patch_embed.proj.weight" in c0["model0"]
    assert "image_encoder.projector.layernorm.weight" in c1["model0"]
    assert "text_decoder.embedding.word_embeddings.weight" in c1["model0"]
    assert {k.split(".")[3] for k in c0["model1"] if k.startswith("text_decoder.decoder.layers.")} == {"0", "1"}
    assert "text_decoder.output_layer.weight" in c1["model1"]
    assert not any(k.startswith("text_decoder") for k in c0["model0"])


# ------------------------------------------------------------------ TP semantics
def test_tp_shards_compute_the_hf_layer(tiny_qwen2vl, tmp_path):
    from omnitune.models.qwen2_vl.spec import SPEC

    hf_to_mm(tiny_qwen2vl, tmp_path / "mm", [[2]], [[2]], tp=2)
    shards = [load_pt(tmp_path / f"mm/release/mp_rank_0{r}/model_optim_rng.pt")["model"] for r in range(2)]
    model = SPEC.model_class().from_pretrained(tiny_qwen2vl).eval()
    layer = model.model.language_model.layers[0]
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    groups, qpg = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    x = torch.randn(5, cfg.hidden_size)
    pre = "text_decoder.decoder.layers.0."
    with torch.no_grad():
        # column parallel qkv: concatenated rank outputs = interleaved [q_g, k_g, v_g] per group
        out = torch.cat([x @ s[pre + "self_attention.linear_qkv.weight"].T + s[pre + "self_attention.linear_qkv.bias"]
                         for s in shards], dim=-1)
        per_group = out.view(5, groups, (qpg + 2) * hd)
        q = per_group[..., :qpg * hd].reshape(5, -1)
        k = per_group[..., qpg * hd:(qpg + 1) * hd].reshape(5, -1)
        v = per_group[..., (qpg + 1) * hd:].reshape(5, -1)
        torch.testing.assert_close(q, layer.self_attn.q_proj(x))
        torch.testing.assert_close(k, layer.self_attn.k_proj(x))
        torch.testing.assert_close(v, layer.self_attn.v_proj(x))
        # row parallel o_proj: summed rank outputs = o_proj
        a = torch.randn(5, cfg.hidden_size)
        o = sum(a.chunk(2, -1)[r] @ shards[r][pre + "self_attention.linear_proj.weight"].T for r in range(2))
        torch.testing.assert_close(o, layer.self_attn.o_proj(a))
        # GLU fc1 (column) + fc2 (row): summed rank outputs = HF MLP
        mlp = 0
        for s in shards:
            gate, up = (x @ s[pre + "mlp.linear_fc1.weight"].T).chunk(2, -1)
            mlp = mlp + (torch.nn.functional.silu(gate) * up) @ s[pre + "mlp.linear_fc2.weight"].T
        torch.testing.assert_close(mlp, layer.mlp(x))
        # vision qkv per head: rank r holds heads [2r, 2r+1], each [q_h, k_h, v_h]
        blk = model.model.visual.blocks[0]
        ref = blk.attn.qkv(x)  # [q | k | v] each embed_dim, heads of size hd_v
        vh = model.config.vision_config.num_heads
        hdv = model.config.vision_config.embed_dim // vh
        vpre = "image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv."
        vo = torch.cat([x @ s[vpre + "weight"].T + s[vpre + "bias"] for s in shards], -1).view(5, vh, 3, hdv)
        torch.testing.assert_close(vo.permute(0, 2, 1, 3).reshape(5, -1), ref)


# ------------------------------------------------------------------ refusals (nothing written)
@pytest.mark.parametrize("llm,vit,tp,field,needle", [
    ("[[2]]", "[[2]]", 4, "tp_size", "num_key_value_heads"),
    ("[[1,2]]", "[[2,0]]", 1, "llm_pp_layers", "sums to 3"),
    ("[[2]]", "[[1,0]]", 1, "vit_pp_layers", "same shape"),
    ("[[1,1]]", "[[1,1]]", 1, "vit_pp_layers", "first LLM"),
    ("[[1,1],[0]]", "[[2,0],[0,0]]", 1, "llm_pp_layers", "same number"),
])
def test_invalid_layouts_refused(tiny_qwen2vl, tmp_path, capsys, llm, vit, tp, field, needle):
    mm = tmp_path / "mm"
    argv = [CONV, "hf_to_mm", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir", str(tiny_qwen2vl),
            "--cfg.parallel_config.llm_pp_layers", llm, "--cfg.parallel_config.vit_pp_layers", vit,
            "--cfg.parallel_config.tp_size", str(tp)]
    try:
        rc = mm_convert(argv)
    except SystemExit as e:  # refused by the parser (pydantic validation)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert field in err and needle in err, err
    assert not mm.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("vit,llm", [
    ([[30, 2, 0, 0]], [[1, 10, 10, 7]]),  # the seeds' wrong example
    ([[10, 10, 10, 2], [0, 0, 0, 0]], [[0, 0, 1, 1], [6, 6, 6, 8]]),
])
def test_vision_after_first_llm_stage_refused(vit, llm):
    par = L.ParallelConfig(llm_pp_layers=llm, vit_pp_layers=vit)
    mods = [L.ModuleSchema("vision", "vit_pp_layers", "vit_tp_size", "image_encoder.", "x.", num_layers=32),
            L.ModuleSchema("LLM", "llm_pp_layers", "tp_size", "text_decoder.", "y.", num_layers=28)]
    with pytest.raises(L.ConvertError, match=r"parallel_config\.vit_pp_layers.*first LLM"):
        L.validate_layout(par, mods)
    # the seeds' good ones
    L.validate_layout(L.ParallelConfig(llm_pp_layers=[[1, 10, 10, 7]], vit_pp_layers=[[32, 0, 0, 0]]), mods)
    L.validate_layout(L.ParallelConfig(llm_pp_layers=[[0, 0, 0, 1], [4, 4, 4, 4], [4, 3, 2, 2]],
                                       vit_pp_layers=[[10, 10, 10, 2], [0, 0, 0, 0], [0, 0, 0, 0]]), mods)


def test_missing_hf_files_refused(tiny_qwen2vl, tmp_path):
    for missing in ("config.json", "model.safetensors"):
        hf = tmp_path / f"no_{missing}"
        hf.mkdir()
        for f in tiny_qwen2vl.iterdir():
            if f.name != missing:
                (hf / f.name).symlink_to(f)
        mm = tmp_path / f"mm_{missing}"
        with pytest.raises(L.ConvertError, match=rf"hf_config\.hf_dir=.*{'config.json' if missing == 'config.json' else 'safetensors'}"):
            hf_to_mm(hf, mm, [[2]], [[2]])
        assert not mm.exists()


def test_non_empty_output_needs_overwrite(tiny_qwen2vl, tmp_path, capsys):
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "keep.txt").write_text("x")
    argv = [CONV, "hf_to_mm", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir", str(tiny_qwen2vl),
            "--cfg.parallel_config.llm_pp_layers", "[[2]]", "--cfg.parallel_config.vit_pp_layers", "[[2]]"]
    assert mm_convert(argv) == 2
    err = capsys.readouterr().err
    assert "mm_dir" in err and "overwrite" in err, err
    assert [p.name for p in mm.iterdir()] == ["keep.txt"]
    assert mm_convert(argv + ["--cfg.overwrite", "true"]) == 0
    assert sorted(p.name for p in mm.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    assert [p.name for p in tmp_path.iterdir()] == ["mm"]  # no temp folder left behind


def test_mm_to_hf_wrong_layout_refused(tiny_qwen2vl, tmp_path):
    hf_to_mm(tiny_qwen2vl, tmp_path / "mm", [[1, 1]], [[2, 0]], tp=2)
    with pytest.raises(L.ConvertError, match="mp_rank_00"):
        mm_to_hf(tiny_qwen2vl, tmp_path / "mm", tmp_path / "hf", [2], [2], tp=2)
    with pytest.raises(L.ConvertError, match="more TP ranks"):
        mm_to_hf(tiny_qwen2vl, tmp_path / "mm", tmp_path / "hf", [1, 1], [2, 0], tp=1)
    assert not (tmp_path / "hf").exists()


def test_help_lists_converters():
    r = subprocess.run([sys.executable, "-m", "omnitune.cli.mm_convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in (CONV, "Qwen2_5_VLConverter", "Qwen2_5_OmniConverter", "Qwen3VLConverter", "ExpertMergeDcpConverter",
                 "moe_expert"):
        assert name in r.stdout, name


def test_print_config_then_config_file_and_env(tiny_qwen2vl, tmp_path, capsys, monkeypatch):
    mm = tmp_path / "mm"
    monkeypatch.setenv("MM_CONVERT_QWEN2VLCONVERTER__HF_TO_MM__CFG__MM_DIR", str(mm))
    argv = [CONV, "hf_to_mm", "--cfg.hf_config.hf_dir", str(tiny_qwen2vl),
            "--cfg.parallel_config.llm_pp_layers", "[[2]]", "--cfg.parallel_config.vit_pp_layers", "[[2]]",
            "--cfg.parallel_config.tp_size", "2"]
    with pytest.raises(SystemExit) as e:
        mm_convert(argv + ["--print_config"])
    assert e.value.code in (0, None)
    yaml_text = capsys.readouterr().out
    assert f"mm_dir: {mm}" in yaml_text and not mm.exists()
    monkeypatch.delenv("MM_CONVERT_QWEN2VLCONVERTER__HF_TO_MM__CFG__MM_DIR")
    (tmp_path / "c.yaml").write_text(yaml_text)
    assert mm_convert([CONV, "hf_to_mm", "--config", str(tmp_path / "c.yaml")]) == 0
    assert sorted(p.name for p in (mm / "release").iterdir()) == ["mp_rank_00", "mp_rank_01"]


def test_resplit_checks_heads_with_hf_config(tiny_qwen2vl, tmp_path):
    hf_to_mm(tiny_qwen2vl, tmp_path / "a", [[2]], [[2]])
    with pytest.raises(L.ConvertError, match=r"target_parallel_config\.tp_size=4: num_key_value_heads=2"):
        Qwen2VLConverter.resplit(ResplitConfig(
            source_dir=tmp_path / "a", target_dir=tmp_path / "b", hf_config={"hf_dir": tiny_qwen2vl},
            source_parallel_config=dict(llm_pp_layers=[2], vit_pp_layers=[2]),
            target_parallel_config=dict(llm_pp_layers=[2], vit_pp_layers=[2], tp_size=4)))
    assert not (tmp_path / "b").exists()


def test_parallel_config_forms():
    a = L.ParallelConfig(llm_pp_layers=[1, 10, 10, 7], vit_pp_layers=[32, 0, 0, 0], tp_size=2)
    assert a.llm_pp_layers == [[1, 10, 10, 7]] and a.pp_size == 4 and a.vpp_size == 1
    b = L.ParallelConfig(llm_pp_layers=[[0, 1], [2, 1]], vit_pp_layers=[[3, 1], [0, 0]], audio_tp_layers=1)
    assert b.audio_tp_size == 1 and b.num_stages == 4  # seed spelling audio_tp_layers = audio_tp_size
    assert L.stage_ranges(b.llm_pp_layers) == [(0, 0), (0, 1), (1, 3), (3, 4)]
    assert L.rank_dir_name(1, 1, 2) == "mp_rank_01_001" and L.rank_dir_name(0, 0, 1) == "mp_rank_00"


def test_mm_to_hf_reads_training_save(tiny_qwen2vl, tmp_path):
    """A training save: iter_0000010/, iteration number in the txt, 'args' Namespace, _extra_state."""
    import argparse

    mm = tmp_path / "mm"
    hf_to_mm(tiny_qwen2vl, mm, [[1, 1]], [[2, 0]])
    (mm / "release").rename(mm / "iter_0000010")
    (mm / "latest_checkpointed_iteration.txt").write_text("10")
    for f in (mm / "iter_0000010").glob("*/model_optim_rng.pt"):
        c = load_pt(f)
        c["model"]["text_decoder.output_layer._extra_state"] = None
        c.update(args=argparse.Namespace(tensor_model_parallel_size=1, params_dtype=torch.bfloat16), iteration=10)
        torch.save(c, f)
    mm_to_hf(tiny_qwen2vl, mm, tmp_path / "hf", [1, 1], [2, 0])
    assert_same_weights(tiny_qwen2vl, tmp_path / "hf")


# ------------------------------------------------------------------ fused weights written from the inputs
def test_row_cat_record_is_written_from_the_input_file(tmp_path):
    """A lazy fusion (RowCat) of mapped input rows is written piece by piece (large pieces copied file to
    file) and loads as exactly torch.cat of the pieces."""
    from safetensors.torch import save_file

    from omnitune.convert.stream import PtWriter, SafetensorsIndex

    torch.manual_seed(0)
    a, b = torch.randn(600, 1024), torch.randn(300, 1024)  # 2.4 MB and 1.2 MB: above FileSink.BIG
    save_file({"a": a, "b": b, "c": torch.randn(3, 1024)}, tmp_path / "in.safetensors")
    ix = SafetensorsIndex(tmp_path)
    ra, rb, rc = ix.read("a"), ix.read("b"), ix.read("c")
    with L.lazy_row_cat():
        fused = L.cat_rows([ra[100:400], rb, rc])
    assert isinstance(fused, L.RowCat) and fused.shape == (603, 1024)
    glu_like = fused.rows(50, 590)  # still lazy, spans all three parts
    struct = {"model": {"w": torch.empty(603, 1024, device="meta"), "x": torch.empty(540, 1024, device="meta"),
                        "y": torch.empty(2, device="meta")}}
    w = PtWriter(tmp_path / "out.pt", struct)
    w.write(("model", "y"), torch.tensor([1.0, 2.0]))
    w.write(("model", "w"), fused)
    w.write(("model", "x"), glu_like)
    copied = w.sink.copied
    w.close()
    ix.close()
    got = load_pt(tmp_path / "out.pt")["model"]
    want = torch.cat([a[100:400], b, load_file(tmp_path / "in.safetensors")["c"]])
    assert torch.equal(got["w"], want)
    assert torch.equal(got["x"], want[50:590])
    assert torch.equal(got["y"], torch.tensor([1.0, 2.0]))
    # pieces of >= 1 MiB went file to file: a[100:400], b (in w) and b[:290] (in x); a[150:400] of x is
    # 1,024,000 bytes, under the threshold, and was written from memory like the small ones
    assert copied == 4 * 1024 * (300 + 300 + 290), copied


def test_lazy_fusion_writes_the_same_bytes(tiny_qwen2vl, tmp_path, monkeypatch):
    """hf_to_mm with lazy fusions (the default) writes files byte-identical to fusing in memory, and the
    fused weights (qkv interleave, gate/up) did take the piecewise path."""
    import contextlib

    from omnitune.convert import stream

    calls = []
    real = stream.FileSink.substitute
    monkeypatch.setattr(stream.FileSink, "substitute", lambda self, *a: (calls.append(a[1]), real(self, *a))[1])
    hf_to_mm(tiny_qwen2vl, tmp_path / "lazy", [[1, 1]], [[2, 0]], tp=2)
    assert len(calls) >= 2 * 2 * 2  # per TP rank at least linear_qkv and linear_fc1 of two LLM layers
    monkeypatch.setattr(L, "lazy_row_cat", contextlib.nullcontext)
    calls.clear()
    hf_to_mm(tiny_qwen2vl, tmp_path / "eager", [[1, 1]], [[2, 0]], tp=2)
    assert calls == []
    files = sorted(p.relative_to(tmp_path / "lazy") for p in (tmp_path / "lazy").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "eager") for p in (tmp_path / "eager").rglob("*") if p.is_file())
    assert len(files) >= 5
    for f in files:
        assert (tmp_path / "lazy" / f).read_bytes() == (tmp_path / "eager" / f).read_bytes(), f


def test_safetensors_writer_survives_short_writes(tmp_path, monkeypatch):
    """os.pwrite may write less than asked (Linux: ~2 GiB per call at most): every byte still lands."""
    import os

    from omnitune.convert import stream

    real = os.pwrite
    calls = []

    def short(fd, data, pos):  # at most 1000 bytes per call
        calls.append(pos)
        return real(fd, memoryview(data)[:1000], pos)

    monkeypatch.setattr(stream.os, "pwrite", short)
    t = torch.arange(3000, dtype=torch.float32).reshape(30, 100)
    w = stream.SafetensorsWriter(tmp_path / "x.safetensors", {"t": torch.empty(30, 100, device="meta")})
    w.write("t", t)
    w.close()
    assert len(calls) >= 12
    assert torch.equal(load_file(tmp_path / "x.safetensors")["t"], t)
