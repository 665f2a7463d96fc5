"""Pipeline parallelism of Qwen3-VL (DeepStack features crossing the stage boundaries) and
Qwen2.5-Omni (vision and audio encoders on stage 0, images + videos + audio): PP2, PP2 + VPP2, PP2 x DP2
and PP2 x TP2 each log the one-process run's losses over 10 steps (1e-4 relative) and step-1 gradient
norm (1e-5). Layouts, flags and the check are test_pipeline.py's (Qwen2-VL runs there)."""
from __future__ import annotations

import pytest

from test_pipeline import LAYOUTS, _layout_model_json
from test_scaleout import check_layouts, family_runs  # noqa: F401  (module fixture: this file's own)

pytestmark = pytest.mark.slow

CASES = [("qwen3_vl", list(LAYOUTS)), ("qwen2_5_omni", list(LAYOUTS))]


@pytest.mark.parametrize("name,layouts", CASES, ids=[c[0] for c in CASES])
def test_pipeline_layouts_match_one_process(name, layouts, family_runs):  # noqa: F811
    check_layouts(name, layouts, family_runs, LAYOUTS, _layout_model_json, marker="stage 1 (PP rank 1")
