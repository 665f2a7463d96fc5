"""Shared fixtures: tiny random-weight HF model folders built offline once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL HF folder (random weights, real Qwen tokenizer and chat template)."""
    from omnitune.models.tiny import build_tiny_model

    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("models") / "tiny_qwen2vl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("qwen3_vl") -> Path`` of a tiny HF folder of that registry family
    (random weights, real Qwen tokenizer, the family's real chat template; Omni: the FULL model).
    Built once per family per session."""
    from omnitune.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("family_models")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_model(family, root / family)
        return cache[family]

    return get
