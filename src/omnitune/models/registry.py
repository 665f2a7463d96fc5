"""Model families by registry name and by model.json ``model_id``. A new family = one line here."""
from __future__ import annotations

import importlib

from omnitune.models.base import ModelFamily

# registry name -> "module" holding SPEC, or "module:ATTR" when a folder holds several specs
FAMILIES: dict[str, str] = {
    "qwen2_vl": "omnitune.models.qwen2_vl.spec",
    "qwen2_5_vl": "omnitune.models.qwen2_5_vl.spec",
    "qwen2_5_omni": "omnitune.models.qwen2_5_omni.spec",
    "qwen3_vl": "omnitune.models.qwen3_vl.spec",
    "qwen3_vl_moe": "omnitune.models.qwen3_vl.spec:MOE_SPEC",
    "qwen3_omni_moe": "omnitune.models.qwen3_omni_moe.spec",
}

_cache: dict[str, ModelFamily] = {}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    if name not in _cache:
        module, _, attr = FAMILIES[name].partition(":")
        _cache[name] = getattr(importlib.import_module(module), attr or "SPEC")
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
    cls = type(config).__name__
    # by name first: model_class() imports the family's transformers modeling module (~0.4 s each)
    for name in FAMILIES:
        if get_family(name).hf_config_class_name == cls:
            return get_family(name)
    for name in FAMILIES:   # e.g. an Omni thinker config: the trainable class's config
        fam = get_family(name)
        if fam.model_class().config_class.__name__ == cls:
            return fam
    raise ValueError(f"no omnitune family for HF config class {type(config).__name__}")
