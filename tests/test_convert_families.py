"""mm-convert for Qwen2.5-VL, Qwen2.5-Omni (Megatron layout), Qwen3-VL / Qwen3-Omni MoE (DCP,
ExpertMerge, moe_expert), TP4, streamed files, and the trainer's --load of Omni mm folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnitune.cli.mm_convert import main as mm_convert
from omnitune.convert import layout as L
from omnitune.convert.megatron import HfToMmConfig, MmToHfConfig, ResplitConfig
from omnitune.convert.qwen2_5 import Qwen2_5_OmniConverter, Qwen2_5_VLConverter

RANK_FILE = "model_optim_rng.pt"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_folder(a: Path, b: Path, same_files: bool = True):
    x, y = weights(a), weights(b)
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:5]
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
    if same_files:
        assert sorted(p.name for p in a.glob("*.safetensors")) == sorted(p.name for p in b.glob("*.safetensors"))
    for f in a.rglob("*"):
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            assert (b / f.relative_to(a)).read_bytes() == f.read_bytes(), f.name


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def flat(layers):
    return [x for c in layers for x in c] if layers and isinstance(layers[0], list) else layers


def convert(conv, hf: Path, mm: Path, out: Path, par: dict) -> None:
    conv.hf_to_mm(HfToMmConfig(mm_dir=mm, hf_config={"hf_dir": hf}, parallel_config=par))
    back = {k: (flat(v) if k.endswith("_layers") and k != "audio_tp_layers" else v) for k, v in par.items()}
    if len(par["llm_pp_layers"]) > 1:  # VPP: mm_to_hf takes the nested lists
        back = par
    conv.mm_to_hf(MmToHfConfig(mm_dir=mm, hf_config={"hf_dir": hf}, save_hf_dir=out, parallel_config=back))


# ------------------------------------------------------------------ Qwen2.5-VL
@pytest.mark.parametrize("par", [
    dict(llm_pp_layers=[[2]], vit_pp_layers=[[2]], tp_size=1),
    dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], tp_size=2),               # tied, PP > 1
    dict(llm_pp_layers=[[0, 1], [1, 0]], vit_pp_layers=[[2, 0], [0, 0]], tp_size=1),  # VPP, zeros
    dict(llm_pp_layers=[[2]], vit_pp_layers=[[2]], tp_size=2, vit_tp_size=1),       # hetero
])
def test_qwen2_5_vl_round_trip(tiny_model_dir, tmp_path, par):
    hf = tiny_model_dir("qwen2_5_vl")
    convert(Qwen2_5_VLConverter, hf, tmp_path / "mm", tmp_path / "hf", par)
    assert_same_folder(hf, tmp_path / "hf")


def test_qwen2_5_vl_vision_glu_and_qkv_tp_semantics(tiny_model_dir, tmp_path):
    """Each rank's column-parallel output (GLU fc1: [gate_r; up_r], qkv per head) and row-parallel
    partial sums (fc2, proj) reduce to the HF vision block's outputs."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = tiny_model_dir("qwen2_5_vl")
    Qwen2_5_VLConverter.hf_to_mm(HfToMmConfig(mm_dir=tmp_path / "mm", hf_config={"hf_dir": hf}, parallel_config=dict(
        llm_pp_layers=[[2]], vit_pp_layers=[[2]], tp_size=2)))
    shards = [load_pt(tmp_path / f"mm/release/mp_rank_0{r}/{RANK_FILE}")["model"] for r in range(2)]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    blk = model.model.visual.blocks[1]
    pre = "image_encoder.encoder.blocks.layers.1."
    x = torch.randn(6, blk.mlp.gate_proj.in_features)
    with torch.no_grad():
        out = 0
        for s in shards:
            gate, up = (x @ s[pre + "mlp.linear_fc1.weight"].T + s[pre + "mlp.linear_fc1.bias"]).chunk(2, -1)
            out = out + (blk.mlp.act_fn(gate) * up) @ s[pre + "mlp.linear_fc2.weight"].T
        torch.testing.assert_close(out + shards[0][pre + "mlp.linear_fc2.bias"], blk.mlp(x))
        heads = model.config.vision_config.num_heads
        hd = x.shape[-1] // heads
        qkv = torch.cat([x @ s[pre + "self_attention.linear_qkv.weight"].T + s[pre + "self_attention.linear_qkv.bias"]
                         for s in shards], -1).view(6, heads, 3, hd)
        torch.testing.assert_close(qkv.permute(0, 2, 1, 3).reshape(6, -1), blk.attn.qkv(x))
        a = torch.randn(6, x.shape[-1])
        proj = sum(a.chunk(2, -1)[r] @ shards[r][pre + "self_attention.linear_proj.weight"].T for r in range(2))
        torch.testing.assert_close(proj + shards[0][pre + "self_attention.linear_proj.bias"], blk.attn.proj(a))


# ------------------------------------------------------------------ Qwen2.5-Omni
def test_qwen2_5_omni_seed_commands(tiny_model_dir, tmp_path):
    """The seed's hf_to_mm / mm_to_hf / hetero commands with only paths and layer lists changed; the
    full folder (talker, token2wav, spk_dict.pt) comes back bit-exact."""
    hf = tiny_model_dir("qwen2_5_omni")
    mm, out = tmp_path / "mm_path", tmp_path / "mm_to_hf"
    assert mm_convert(["Qwen2_5_OmniConverter", "hf_to_mm", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir", str(hf),
                       "--cfg.parallel_config.llm_pp_layers", "[[1,1]]", "--cfg.parallel_config.vit_pp_layers", "[[2,0]]",
                       "--cfg.parallel_config.audio_pp_layers", "[[2,0]]", "--cfg.parallel_config.tp_size", "1"]) == 0
    first = load_pt(mm / f"release/mp_rank_00_000/{RANK_FILE}")["model"]
    last = load_pt(mm / f"release/mp_rank_00_001/{RANK_FILE}")["model"]
    assert {"audio_encoder.encoder.conv1.weight", "audio_encoder.encoder.audio_bos_eos_token.weight",
            "audio_encoder.encoder.proj.weight", "audio_encoder.encoder.ln_post.weight",
            "audio_encoder.encoder.blocks.layers.1.self_attention.linear_qkv.bias"} <= set(first)
    assert not any(k.startswith(("audio_encoder", "image_encoder")) for k in last)
    assert "text_decoder.output_layer.weight" in last and not any("talker" in k or "token2wav" in k for k in first)
    # audio k has no bias: a zero k part per head in the fused bias
    heads = 4
    b = first["audio_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.bias"].view(heads, 3, -1)
    src = load_file(hf / "model.safetensors")
    assert torch.count_nonzero(b[:, 1]) == 0
    torch.testing.assert_close(b[:, 0].reshape(-1), src["thinker.audio_tower.layers.0.self_attn.q_proj.bias"], rtol=0, atol=0)
    assert mm_convert(["Qwen2_5_OmniConverter", "mm_to_hf", "--cfg.save_hf_dir", str(out), "--cfg.mm_dir", str(mm),
                       "--cfg.hf_config.hf_dir", str(hf), "--cfg.parallel_config.llm_pp_layers", "[1,1]",
                       "--cfg.parallel_config.vit_pp_layers", "[2,0]", "--cfg.parallel_config.audio_pp_layers", "[2,0]",
                       "--cfg.parallel_config.tp_size", "1"]) == 0
    assert_same_folder(hf, out)
    # hetero: vit and audio unsplit, LLM TP2; the seed spells audio_tp_layers
    het = tmp_path / "het"
    assert mm_convert(["Qwen2_5_OmniConverter", "hf_to_mm", "--cfg.mm_dir", str(het), "--cfg.hf_config.hf_dir", str(hf),
                       "--cfg.parallel_config.llm_pp_layers", "[[2]]", "--cfg.parallel_config.vit_pp_layers", "[[2]]",
                       "--cfg.parallel_config.audio_pp_layers", "[[2]]", "--cfg.parallel_config.tp_size", "2",
                       "--cfg.parallel_config.vit_tp_size", "1", "--cfg.parallel_config.audio_tp_layers", "1"]) == 0
    r0, r1 = (load_pt(het / f"release/mp_rank_0{r}/{RANK_FILE}")["model"] for r in range(2))
    k = "audio_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(r0[k], r1[k]) and r0[k].shape[0] == 3 * 64
    llm = "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"
    assert r0[llm].shape[0] * 2 == first[llm].shape[0]
    Qwen2_5_OmniConverter.mm_to_hf(MmToHfConfig(mm_dir=het, hf_config={"hf_dir": hf}, save_hf_dir=tmp_path / "het_hf",
                                                parallel_config=dict(llm_pp_layers=[2], vit_pp_layers=[2], audio_pp_layers=[2],
                                                                     tp_size=2, vit_tp_size=1, audio_tp_size=1)))
    assert_same_folder(hf, tmp_path / "het_hf")


@pytest.mark.parametrize("a,b", [
    (dict(llm_pp_layers=[2], vit_pp_layers=[2], audio_pp_layers=[2], tp_size=2),
     dict(llm_pp_layers=[0, 2], vit_pp_layers=[2, 0], audio_pp_layers=[1, 1], tp_size=1)),
    (dict(llm_pp_layers=[1, 1], vit_pp_layers=[2, 0], audio_pp_layers=[2, 0], tp_size=1),
     dict(llm_pp_layers=[2], vit_pp_layers=[2], audio_pp_layers=[2], tp_size=2, audio_tp_size=1)),
])
def test_qwen2_5_omni_resplit(tiny_model_dir, tmp_path, a, b):
    hf = tiny_model_dir("qwen2_5_omni")
    Qwen2_5_OmniConverter.hf_to_mm(HfToMmConfig(mm_dir=tmp_path / "a", hf_config={"hf_dir": hf},
                                                parallel_config={k: ([v] if k.endswith("_layers") else v) for k, v in a.items()}))
    Qwen2_5_OmniConverter.resplit(ResplitConfig(source_dir=tmp_path / "a", target_dir=tmp_path / "b",
                                                source_parallel_config=a, target_parallel_config=b,
                                                hf_config={"hf_dir": hf}))
    Qwen2_5_OmniConverter.mm_to_hf(MmToHfConfig(mm_dir=tmp_path / "b", hf_config={"hf_dir": hf},
                                                save_hf_dir=tmp_path / "hf", parallel_config=b))
    assert_same_folder(hf, tmp_path / "hf")


def test_qwen2_5_omni_audio_tp_semantics(tiny_model_dir, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    hf = tiny_model_dir("qwen2_5_omni")
    Qwen2_5_OmniConverter.hf_to_mm(HfToMmConfig(mm_dir=tmp_path / "mm", hf_config={"hf_dir": hf}, parallel_config=dict(
        llm_pp_layers=[[2]], vit_pp_layers=[[2]], audio_pp_layers=[[2]], tp_size=2)))
    shards = [load_pt(tmp_path / f"mm/release/mp_rank_0{r}/{RANK_FILE}")["model"] for r in range(2)]
    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    layer = thinker.model.audio_tower.layers[0] if hasattr(thinker.model, "audio_tower") else thinker.audio_tower.layers[0]
    pre = "audio_encoder.encoder.blocks.layers.0."
    x = torch.randn(5, 64)
    with torch.no_grad():
        qkv = torch.cat([x @ s[pre + "self_attention.linear_qkv.weight"].T + s[pre + "self_attention.linear_qkv.bias"]
                         for s in shards], -1).view(5, 4, 3, 16)
        q, k, v = (qkv[:, :, j].reshape(5, -1) for j in range(3))
        torch.testing.assert_close(q, layer.self_attn.q_proj(x))
        torch.testing.assert_close(k, layer.self_attn.k_proj(x))  # k_proj has no bias: the zero part
        torch.testing.assert_close(v, layer.self_attn.v_proj(x))
        a = torch.randn(5, 64)
        o = sum(a.chunk(2, -1)[r] @ shards[r][pre + "self_attention.linear_proj.weight"].T for r in range(2))
        torch.testing.assert_close(o + shards[0][pre + "self_attention.linear_proj.bias"], layer.self_attn.out_proj(a))
        h = sum(torch.nn.functional.gelu(x @ s[pre + "mlp.linear_fc1.weight"].T + s[pre + "mlp.linear_fc1.bias"])
                @ s[pre + "mlp.linear_fc2.weight"].T for s in shards)
        torch.testing.assert_close(h + shards[0][pre + "mlp.linear_fc2.bias"], layer.fc2(torch.nn.functional.gelu(layer.fc1(x))))


def test_qwen2_5_omni_invalid_layouts_refused(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("qwen2_5_omni")
    cases = [
        (dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]]), "audio_pp_layers is required"),
        (dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], audio_pp_layers=[[1, 1]]), "audio_pp_layers"),
        (dict(llm_pp_layers=[[2]], vit_pp_layers=[[2]], audio_pp_layers=[[3]]), "sums to 3"),
        (dict(llm_pp_layers=[[2]], vit_pp_layers=[[2]], audio_pp_layers=[[2]], tp_size=2, audio_tp_size=3),
         "audio_tp_size=3"),
    ]
    for par, needle in cases:
        mm = tmp_path / "mm"
        with pytest.raises(L.ConvertError, match=needle):
            Qwen2_5_OmniConverter.hf_to_mm(HfToMmConfig(mm_dir=mm, hf_config={"hf_dir": hf}, parallel_config=par))
        assert not mm.exists() and list(tmp_path.iterdir()) == []


def test_mm_load_omni_thinker(tiny_model_dir, tmp_path):
    """--load of a hetero-TP, PP Omni mm folder fills the thinker exactly with the folder's thinker weights."""
    from transformers import AutoConfig

    from omnitune.checkpoint.mm_load import load_mm_weights
    from omnitune.models.registry import get_family
    from omnitune.train.model import load_hf_model

    hf = tiny_model_dir("qwen2_5_omni")
    fam = get_family("qwen2_5_omni")
    Qwen2_5_OmniConverter.hf_to_mm(HfToMmConfig(mm_dir=tmp_path / "mm", hf_config={"hf_dir": hf}, parallel_config=dict(
        llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], audio_pp_layers=[[2, 0]], tp_size=2, vit_tp_size=1)))
    cfg = AutoConfig.from_pretrained(hf).thinker_config
    model = load_hf_model(fam, None, cfg, init_weights=False)
    par = load_mm_weights(tmp_path / "mm", fam, model)
    assert (par.tp_size, par.module_tp("vit_tp_size"), par.module_tp("audio_tp_size")) == (2, 1, 2)
    src = load_file(hf / "model.safetensors")
    got = model.state_dict()

    def folder_key(k):  # the thinker's module names -> the full folder's names (independent of the keymap)
        for a, b in (("model.language_model.", "model."), ("model.visual.", "visual."), ("model.audio_tower.", "audio_tower.")):
            if k.startswith(a):
                return "thinker." + b + k[len(a):]
        return "thinker." + k
    assert {folder_key(k) for k in got} == {k for k in src if k.startswith("thinker.")}
    for k, v in got.items():
        assert torch.equal(v, src[folder_key(k)]), k


# ------------------------------------------------------------------ TP 4
def test_tp4_round_trip_and_semantics(tmp_path):
    from omnitune.convert.qwen2vl import Qwen2VLConverter
    from omnitune.models.qwen2_vl.spec import SPEC

    c = SPEC.tiny_config("tiny")
    c.text_config.num_key_value_heads = 4  # 4 KV heads: TP 4 is valid
    t = c.text_config
    t.vocab_size, t.pad_token_id, t.bos_token_id, t.eos_token_id = 256, 0, 1, 2
    torch.manual_seed(3)
    hf = tmp_path / "kv4"
    SPEC.model_class()(c).save_pretrained(hf)
    for par in (dict(llm_pp_layers=[[2]], vit_pp_layers=[[2]], tp_size=4),
                dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], tp_size=4, vit_tp_size=2)):
        mm, out = tmp_path / f"mm{len(par)}", tmp_path / f"hf{len(par)}"
        convert(Qwen2VLConverter, hf, mm, out, par)
        assert_same_folder(hf, out)
    shards = [load_pt(tmp_path / f"mm3/release/mp_rank_0{r}/{RANK_FILE}")["model"] for r in range(4)]
    model = SPEC.model_class().from_pretrained(hf).eval()
    layer = model.model.language_model.layers[1]
    pre = "text_decoder.decoder.layers.1."
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = torch.cat([x @ s[pre + "self_attention.linear_qkv.weight"].T + s[pre + "self_attention.linear_qkv.bias"]
                         for s in shards], -1).view(3, 4, 3, 16)  # 4 groups of [q (1 head), k, v]
        torch.testing.assert_close(out[:, :, 0].reshape(3, -1), layer.self_attn.q_proj(x))
        torch.testing.assert_close(out[:, :, 1].reshape(3, -1), layer.self_attn.k_proj(x))
        torch.testing.assert_close(out[:, :, 2].reshape(3, -1), layer.self_attn.v_proj(x))
        mlp = 0
        for s in shards:
            gate, up = (x @ s[pre + "mlp.linear_fc1.weight"].T).chunk(2, -1)
            mlp = mlp + (torch.nn.functional.silu(gate) * up) @ s[pre + "mlp.linear_fc2.weight"].T
        torch.testing.assert_close(mlp, layer.mlp(x))
        emb = torch.cat([s["text_decoder.embedding.word_embeddings.weight"] for s in shards])
        torch.testing.assert_close(emb, model.model.language_model.embed_tokens.weight, rtol=0, atol=0)


# ------------------------------------------------------------------ DCP
def _dcp_state(folder: Path) -> dict:
    """The DCP as MindSpeed-MM reads it back (no target state dict: names from the metadata)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_vl_dcp_round_trip(tiny_model_dir, tmp_path, family):
    hf = tiny_model_dir(family)
    dcp, out = tmp_path / "Qwen3-VL-dcp", tmp_path / "iter_hf"
    assert mm_convert(["Qwen3VLConverter", "hf_to_dcp", "--hf_dir", str(hf), "--dcp_dir", str(dcp)]) == 0
    assert (dcp / "latest_checkpointed_iteration.txt").read_text() == "release"
    sd = _dcp_state(dcp / "release")
    src = weights(hf)
    assert sd["checkpoint_version"] == 3.0 and set(sd["model"]) == {"model." + k for k in src}
    for k, v in src.items():
        got = sd["model"]["model." + k]
        if v.dim() == 3:  # fused experts are stored 2-D: [E*H, 2I] / [E*I, H]
            assert got.shape == (v.shape[0] * v.shape[1], v.shape[2])
        assert torch.equal(got.reshape(v.shape), v), k
    assert mm_convert(["Qwen3VLConverter", "dcp_to_hf", "--load_dir", str(dcp / "release") + "/",
                       "--save_dir", str(out), "--model_assets_dir", str(hf)]) == 0
    assert_same_folder(hf, out)


def test_qwen3_vl_dcp_to_hf_reads_a_dcp_saved_by_torch_with_trainer_names(tiny_model_dir, tmp_path):
    """A DCP written by torch's dcp.save with omnitune's training names ('model.' + HF name, one
    'model.' less than MindSpeed-MM), given as the iteration folder."""
    import torch.distributed.checkpoint as dcp

    hf = tiny_model_dir("qwen3_vl")
    src = weights(hf)
    dcp.save({"model": src}, checkpoint_id=str(tmp_path / "iter_0000003"), no_dist=True)
    out = tmp_path / "hf"
    assert mm_convert(["Qwen3VLConverter", "dcp_to_hf", "--load_dir", str(tmp_path / "iter_0000003"),
                       "--save_dir", str(out), "--model_assets_dir", str(hf), "--to_bf16", "true"]) == 0
    got = weights(out)
    assert set(got) == set(src)
    for k in src:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k].to(torch.bfloat16)), k


def test_dcp_converters_refuse_bad_input(tiny_model_dir, tmp_path, capsys):
    hf = tiny_model_dir("qwen2_5_vl")
    assert mm_convert(["Qwen3VLConverter", "hf_to_dcp", "--hf_dir", str(hf), "--dcp_dir", str(tmp_path / "d")]) == 2
    assert "hf_dir" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert mm_convert(["ExpertMergeDcpConverter", "dcp_to_hf", "--hf_dir", str(tiny_model_dir("qwen3_omni_moe")),
                       "--dcp_dir", str(tmp_path), "--save_dir", str(tmp_path / "o")]) == 2
    assert "dcp_dir" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_expert_merge_dcp_round_trip(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("qwen3_omni_moe")
    cfg = json.loads((hf / "config.json").read_text())["thinker_config"]["text_config"]
    n_exp = cfg.get("num_experts") or cfg["num_local_experts"]
    save = tmp_path / "convert_path"
    assert mm_convert(["ExpertMergeDcpConverter", "hf_to_dcp", "--hf_dir", str(hf), "--save_dir", str(save)]) == 0
    sd = _dcp_state(save / "release")["model"]
    src = weights(hf)
    gu = sd["model.model.layers.1.mlp.experts.gate_up_proj"]
    dn = sd["model.model.layers.1.mlp.experts.down_proj"]
    g, u, d = (src[f"thinker.model.layers.1.mlp.experts.2.{n}_proj.weight"] for n in ("gate", "up", "down"))
    assert gu.shape == (n_exp, g.shape[1], 2 * g.shape[0]) and dn.shape == (n_exp, d.shape[1], d.shape[0])
    assert torch.equal(gu[2], torch.cat([g, u]).T) and torch.equal(dn[2], d.T)
    assert torch.equal(sd["model.lm_head.weight"], src["thinker.lm_head.weight"])
    assert torch.equal(sd["model.talker.codec_head.weight"], src["talker.codec_head.weight"])
    out = tmp_path / "dcp_to_hf"
    assert mm_convert(["ExpertMergeDcpConverter", "dcp_to_hf", "--hf_dir", str(hf), "--dcp_dir",
                       str(save / "release"), "--save_dir", str(out)]) == 0
    assert_same_folder(hf, out, same_files=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)


def test_moe_expert_merge_split(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("qwen3_omni_moe")
    merged, split = tmp_path / "merged_weight", tmp_path / "splited_weight"
    assert mm_convert(["moe_expert", "--style", "merge", "--hf_dir", str(hf), "--save_dir", str(merged),
                       "--max_shard_size", "4MB"]) == 0
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    for f in files:  # shards of at most 4 MB unless one tensor alone is larger
        keys = [k for k, v in index["weight_map"].items() if v == f]
        assert len(keys) == 1 or (merged / f).stat().st_size <= 4e6 + 64 * 1024, (f, len(keys))
    m = weights(merged)
    assert "model.layers.0.mlp.experts.gate_up_proj" in m and not any(k.startswith("thinker.") for k in m)
    assert not any(".experts.0." in k for k in m if k.startswith("model."))
    assert mm_convert(["moe_expert", "--style", "split", "--hf_dir", str(merged), "--save_dir", str(split)]) == 0
    assert_same_folder(hf, split, same_files=False)


# ------------------------------------------------------------------ streamed files
def test_streamed_pt_file_is_a_torch_save_file(tmp_path):
    """PtWriter's output loads with torch.load (also mmap) and PtIndex reads torch.save files, views included."""
    from omnitune.convert.stream import PtIndex, PtWriter

    a, b = torch.randn(4, 6).to(torch.bfloat16), torch.arange(10).view(2, 5)
    w = PtWriter(tmp_path / "x.pt", {"model0": {"a": a.to("meta")}, "model1": {"b": b.to("meta")}, "checkpoint_version": 3.0})
    w.write(("model1", "b"), b)
    w.write(("model0", "a"), a)
    w.close()
    for mmap in (False, True):
        x = torch.load(tmp_path / "x.pt", weights_only=True, mmap=mmap)
        assert x["checkpoint_version"] == 3.0 and torch.equal(x["model0"]["a"], a) and torch.equal(x["model1"]["b"], b)
    full = torch.randn(6, 4)
    torch.save({"model": {"v": full[:, 1:3], "w": full, "z": torch.randn(5)}}, tmp_path / "y.pt")
    ix = PtIndex(tmp_path / "y.pt")
    assert torch.equal(ix.read(("model", "v")), full[:, 1:3]) and torch.equal(ix.read(("model", "w")), full)
    w = PtWriter(tmp_path / "z.pt", {"model": {"a": a.to("meta")}})
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_qwen2_5_vl_new_style_names_round_trip(tiny_model_dir, tmp_path):
    """A folder saved with transformers-5 module names (model.visual., model.language_model.) converts
    to the same mm tensors and comes back under its own names."""
    import shutil

    from safetensors.torch import save_file

    hf = tiny_model_dir("qwen2_5_vl")
    new = tmp_path / "new_style"
    shutil.copytree(hf, new)
    sd = load_file(new / "model.safetensors")
    renamed = {("model.visual." + k[len("visual."):]) if k.startswith("visual.") else
               ("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v for k, v in sd.items()}
    assert set(renamed) != set(sd)
    save_file(renamed, str(new / "model.safetensors"), metadata={"format": "pt"})
    par = dict(llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]], tp_size=2)
    convert(Qwen2_5_VLConverter, new, tmp_path / "mm_new", tmp_path / "hf_new", par)
    assert_same_folder(new, tmp_path / "hf_new")
    Qwen2_5_VLConverter.hf_to_mm(HfToMmConfig(mm_dir=tmp_path / "mm_old", hf_config={"hf_dir": hf}, parallel_config=par))
    for f in (tmp_path / "mm_old").rglob(RANK_FILE):
        a, b = load_pt(f)["model"], load_pt(tmp_path / "mm_new" / f.relative_to(tmp_path / "mm_old"))["model"]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
