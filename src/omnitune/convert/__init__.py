"""mm-convert: Hugging Face <-> MindSpeed-MM checkpoint converters.

Family-agnostic machinery is in ``layout``; each converter module (``qwen2vl``...) combines it with
its family's ``models/<family>/keymap.py``. ``converters()`` lists the classes the CLI exposes.
"""
from __future__ import annotations


def converters() -> list[type]:
    from omnitune.convert.dcp_converters import CONVERTERS as dcp
    from omnitune.convert.qwen2_5 import CONVERTERS as qwen2_5
    from omnitune.convert.qwen2vl import CONVERTERS as qwen2vl

    return [*qwen2vl, *qwen2_5, *dcp]
