"""Scale-out of Qwen3-VL-MoE through the real CLI: TP2, CP2, DP2 x TP2, DP2 x CP2 and EP2 train 10
iterations like one process (see test_scaleout.py, whose checks these are; a file of its own so the
suite's two workers run it beside test_scaleout.py), and its DP2 x TP2 checkpoint exports. One test
per layout (the one-process reference is the module fixture's), each within the per-test timeout."""
from __future__ import annotations

import pytest
from test_scaleout import MOE_CASE, check_layouts, family_runs  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout", MOE_CASE[1])
def test_layouts_match_one_process_moe(layout, family_runs):  # noqa: F811
    check_layouts(MOE_CASE[0], [layout], family_runs)
