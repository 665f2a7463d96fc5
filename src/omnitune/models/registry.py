"""Model families by registry name and by model.json ``model_id``. A new family = one line here."""
from __future__ import annotations

import importlib

from omnitune.models.base import ModelFamily

# registry name -> module holding SPEC
FAMILIES: dict[str, str] = {
    "qwen2_vl": "omnitune.models.qwen2_vl.spec",
}

_cache: dict[str, ModelFamily] = {}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    if name not in _cache:
        _cache[name] = importlib.import_module(FAMILIES[name]).SPEC
    return _cache[name]


def family_for_model_id(model_id: str) -> ModelFamily:
    ids = {}
    for name in FAMILIES:
        fam = get_family(name)
        for mid in fam.model_ids:
            ids[mid] = fam
    if model_id not in ids:
        raise ValueError(f"model.json model_id {model_id!r} is not supported; supported: {sorted(ids)}")
    return ids[model_id]


def family_for_hf_config(config) -> ModelFamily:
    for name in FAMILIES:
        fam = get_family(name)
        if type(config).__name__ == fam.hf_config_class_name:
            return fam
    raise ValueError(f"no omnitune family for HF config class {type(config).__name__}")
