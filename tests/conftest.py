"""Shared fixtures: tiny random-weight HF model folders built offline once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL HF folder (random weights, real Qwen tokenizer and chat template)."""
    from omnitune.models.tiny import build_tiny_model

    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("models") / "tiny_qwen2vl")
