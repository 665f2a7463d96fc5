"""``mm-convert Qwen3VLConverter|ExpertMergeDcpConverter {hf_to_dcp, dcp_to_hf}`` and
``mm-convert moe_expert --style merge|split``: MindSpeed-MM's FSDP2 (DCP) checkpoints.

Flags as in MindSpeed-MM (``--hf_dir --dcp_dir``, ``--load_dir --save_dir --model_assets_dir``,
``--hf_dir --save_dir``, ``--hf_dir --dcp_dir --save_dir``), plus ``--overwrite``. Everything streams
one layer at a time (``dcp``); outputs are written to a temp folder and renamed. Which names fuse
and how is in ``omnitune.models.qwen3_vl.keymap`` / ``omnitune.models.qwen3_omni_moe.keymap``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from omnitune.convert import dcp as D
from omnitune.convert import layout as L
from omnitune.convert.stream import SafetensorsIndex
from omnitune.models.qwen3_omni_moe import keymap as OMNI
from omnitune.models.qwen3_vl import keymap as QVL


def _config(hf_dir: Path, field_name: str, model_types: tuple[str, ...], what: str) -> dict:
    L.check_hf_dir(hf_dir, field_name)
    cfg = L.read_hf_config(hf_dir)
    if cfg.get("model_type") not in model_types:
        raise L.ConvertError(f"{field_name}={hf_dir}: config.json model_type is {cfg.get('model_type')!r}; "
                             f"{what} converts {', '.join(model_types)} folders")
    return cfg


def _prefixed(dcp_prefix: str, hf_prefix: str):
    def rename(k: str) -> str:
        return k.replace(hf_prefix, dcp_prefix, 1) if hf_prefix else dcp_prefix + k
    return rename



class Qwen3VLConverter:
    """Qwen3-VL (dense / MoE): Hugging Face <-> MindSpeed-MM FSDP2 (DCP) checkpoints."""

    @staticmethod
    def hf_to_dcp(hf_dir: Path, dcp_dir: Path, tie_weight: bool = False, overwrite: bool = False) -> None:
        """Hugging Face folder -> <dcp_dir>/release DCP checkpoint (+ latest_checkpointed_iteration.txt).

        Args:
            hf_dir: original HF folder (config.json + *.safetensors)
            dcp_dir: output folder
            tie_weight: also store lm_head.weight (= the embedding)
            overwrite: replace a non-empty dcp_dir
        """
        _config(hf_dir, "hf_dir", QVL.MODEL_TYPES, "Qwen3VLConverter")
        D.hf_to_dcp_stream(hf_dir, dcp_dir, lambda sd: {D.DCP_PREFIX + k: v for k, v in
                                                        QVL.hf_to_dcp(sd, tie_weight).items()},
                           overwrite, "dcp_dir")

    @staticmethod
    def dcp_to_hf(load_dir: Path, save_dir: Path, model_assets_dir: Path, to_bf16: bool = False,
                  overwrite: bool = False) -> None:
        """DCP checkpoint (an iter_XXXXXXX / release folder) -> Hugging Face folder laid out like
        model_assets_dir (same safetensors files; its config, tokenizer and other files copied).

        Args:
            load_dir: DCP iteration folder (or its parent with latest_checkpointed_iteration.txt)
            save_dir: output HF folder
            model_assets_dir: original HF folder
            to_bf16: cast the weights to bfloat16
            overwrite: replace a non-empty save_dir
        """
        cfg = _config(model_assets_dir, "model_assets_dir", QVL.MODEL_TYPES, "Qwen3VLConverter")
        L.check_output_dir(save_dir, overwrite, "save_dir")
        assets = SafetensorsIndex(model_assets_dir)
        src = D.DcpSource(load_dir, "load_dir", expected=set(assets.keys()))
        experts = QVL.num_experts(cfg)

        def conv(sd: dict) -> dict:
            out = QVL.dcp_to_hf(sd, experts)
            return {k: (v.to(torch.bfloat16) if to_bf16 and v.is_floating_point() else v)
                    for k, v in out.items() if k in assets}

        groups = src.groups()
        metas = {}
        for g, names in groups.items():
            metas.update(conv({n: src.meta(n) for n in names}))
        _check_covered(assets, metas, "load_dir", load_dir, "model_assets_dir", model_assets_dir)
        for k, t in metas.items():
            if tuple(t.shape) != tuple(assets.meta(k).shape):
                raise L.ConvertError(f"load_dir={load_dir}: {k!r} is {tuple(t.shape)}, model_assets_dir has "
                                     f"{tuple(assets.meta(k).shape)}")
        files = assets.file_keys
        loaders = [(g, (lambda names=names: conv({n: src.read(n) for n in names}))) for g, names in groups.items()]
        D.write_hf_stream(save_dir, model_assets_dir, loaders, metas, files, write_index=False,
                          desc="dcp_to_hf", keep_index_of_assets=True)
        assets.close()


def _check_covered(assets: SafetensorsIndex, metas: dict, field_src: str, src, field_assets: str, assets_dir) -> None:
    missing = [k for k in assets.keys() if k not in metas]
    if missing:
        raise L.ConvertError(f"{field_src}={src} lacks {len(missing)} weights of {field_assets}={assets_dir} "
                             f"(e.g. {missing[:3]})")


class ExpertMergeDcpConverter:
    """MoE models with one weight per expert (Qwen3-Omni MoE) <-> DCP with the experts merged."""

    @staticmethod
    def hf_to_dcp(hf_dir: Path, save_dir: Path, dcp_prefix: str = "model.", hf_prefix: str = "",
                  overwrite: bool = False) -> None:
        """HF folder -> <save_dir>/release DCP with merged experts (3-D [E, H, 2I] / [E, I, H]).

        Args:
            hf_dir: original HF folder (full Qwen3-Omni model)
            save_dir: output folder
            dcp_prefix: prefix of every name inside the DCP "model" entry
            hf_prefix: HF name prefix replaced by dcp_prefix (empty: dcp_prefix is prepended)
            overwrite: replace a non-empty save_dir
        """
        cfg = _config(hf_dir, "hf_dir", OMNI.MODEL_TYPES, "ExpertMergeDcpConverter")
        _, experts = OMNI.expert_config(cfg)
        rename = _prefixed(dcp_prefix, hf_prefix)
        D.hf_to_dcp_stream(hf_dir, save_dir, lambda sd: {rename(k): v for k, v in OMNI.merge(sd, experts).items()},
                           overwrite, "save_dir", desc="hf_to_dcp")

    @staticmethod
    def dcp_to_hf(hf_dir: Path, dcp_dir: Path, save_dir: Path, dcp_prefix: str = "model.", hf_prefix: str = "",
                  overwrite: bool = False) -> None:
        """DCP with merged experts -> HF folder with one weight per expert (4 GB shards + index) and
        the non-weight files of hf_dir.

        Args:
            hf_dir: original HF folder (config, tokenizer, ...)
            dcp_dir: DCP iteration folder (e.g. save_dir/iter_0000100)
            save_dir: output HF folder
            dcp_prefix: prefix of the names inside the DCP "model" entry
            hf_prefix: what dcp_prefix is replaced by
            overwrite: replace a non-empty save_dir
        """
        cfg = _config(hf_dir, "hf_dir", OMNI.MODEL_TYPES, "ExpertMergeDcpConverter")
        L.check_output_dir(save_dir, overwrite, "save_dir")
        _, experts = OMNI.expert_config(cfg)
        idx = SafetensorsIndex(hf_dir)
        expected = set()
        for keys in D.hf_groups(idx).values():
            expected |= set(OMNI.merge({k: idx.meta(k) for k in keys}, experts))
        idx.close()
        src = D.DcpSource(dcp_dir, "dcp_dir", inner_prefix=dcp_prefix, expected=expected)
        def rename(k: str) -> str:
            return hf_prefix + k

        groups = src.groups()
        _split_to_hf(lambda names: {rename(n): src.read(n) for n in names},
                     lambda names: {rename(n): src.meta(n) for n in names}, groups, hf_dir, save_dir,
                     D.parse_size("4GB"), "dcp_to_hf")


def _split_to_hf(read, meta, groups: dict, hf_dir: Path, save_dir: Path, max_shard: int, desc: str) -> None:
    """Merged-expert groups -> HF (one weight per expert), ordered like hf_dir, sharded, + index."""
    metas = {}
    for names in groups.values():
        metas.update(OMNI.split(meta(names)))
    order = _order_like(hf_dir, metas)
    files = D.plan_shards(order, max_shard)
    loaders = [(g, (lambda names=names: OMNI.split(read(names)))) for g, names in groups.items()]
    D.write_hf_stream(save_dir, hf_dir, loaders, metas, files, write_index=True, desc=desc)


def _order_like(hf_dir: Path, metas: dict) -> dict:
    """metas ordered as the weights of hf_dir (its index order), new names after."""
    idx = SafetensorsIndex(hf_dir)
    ref = {k: i for i, k in enumerate(idx.keys())}
    idx.close()
    return dict(sorted(metas.items(), key=lambda kv: (ref.get(kv[0], len(ref)), kv[0])))


def moe_expert(style: Literal["merge", "split"], hf_dir: Path, save_dir: Path, max_shard_size: str = "4GB",
               overwrite: bool = False) -> None:
    """Merge a MoE model's per-expert weights into stacked ones (merge), or split them back (split).

    Args:
        style: merge or split
        hf_dir: input HF folder (merge: the original; split: a merged folder)
        save_dir: output folder (safetensors shards + model.safetensors.index.json + the other files)
        max_shard_size: largest safetensors shard, e.g. 4GB or 500MB
        overwrite: replace a non-empty save_dir
    """
    cfg = _config(hf_dir, "hf_dir", OMNI.MODEL_TYPES, "moe_expert")
    L.check_output_dir(save_dir, overwrite, "save_dir")
    size = D.parse_size(max_shard_size)
    idx = SafetensorsIndex(hf_dir)
    groups = D.hf_groups(idx)
    try:
        if style == "merge":
            _, experts = OMNI.expert_config(cfg)
            metas = {}
            for keys in groups.values():
                metas.update(OMNI.merge({k: idx.meta(k) for k in keys}, experts))
            files = D.plan_shards(metas, size)
            loaders = [(g, (lambda keys=keys: OMNI.merge({k: idx.read(k) for k in keys}, experts)))
                       for g, keys in groups.items()]
            D.write_hf_stream(save_dir, hf_dir, loaders, metas, files, write_index=True, desc="moe_expert merge")
        elif style == "split":
            _split_to_hf(lambda keys: {k: idx.read(k) for k in keys}, lambda keys: {k: idx.meta(k) for k in keys},
                         groups, hf_dir, save_dir, size, "moe_expert split")
        else:
            raise L.ConvertError(f"style={style!r}: use merge or split")
    finally:
        idx.close()


CONVERTERS = [Qwen3VLConverter, ExpertMergeDcpConverter, moe_expert]
