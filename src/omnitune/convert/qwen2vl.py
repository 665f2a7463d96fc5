"""``mm-convert Qwen2VLConverter {hf_to_mm, mm_to_hf, resplit}``: omnitune.convert.megatron applied
to the Qwen2-VL keymap (omnitune.models.qwen2_vl.keymap)."""
from __future__ import annotations

from omnitune.convert.megatron import HfConfig, HfToMmConfig, MmToHfConfig, ResplitConfig, make_converter  # noqa: F401
from omnitune.models.qwen2_vl import keymap as K

Qwen2VLConverter = make_converter("Qwen2VLConverter", K, "Qwen2-VL: Hugging Face <-> MindSpeed-MM checkpoints.",
                                  family="qwen2_vl")

CONVERTERS = [Qwen2VLConverter]
