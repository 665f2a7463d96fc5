"""``mm-convert Qwen2_5_VLConverter|Qwen2_5_OmniConverter {hf_to_mm, mm_to_hf, resplit}``:
omnitune.convert.megatron applied to the family keymaps (omnitune.models.qwen2_5_vl.keymap,
omnitune.models.qwen2_5_omni.keymap). The Omni converter reads a full HF folder (thinker + talker
+ token2wav), converts the thinker and writes the rest back untouched on mm_to_hf."""
from __future__ import annotations

from omnitune.convert.megatron import make_converter
from omnitune.models.qwen2_5_omni.keymap import KEYMAP as OMNI
from omnitune.models.qwen2_5_vl.keymap import KEYMAP as VL

Qwen2_5_VLConverter = make_converter("Qwen2_5_VLConverter", VL, "Qwen2.5-VL: Hugging Face <-> MindSpeed-MM checkpoints.",
                                     family="qwen2_5_vl")
Qwen2_5_OmniConverter = make_converter(
    "Qwen2_5_OmniConverter", OMNI,
    "Qwen2.5-Omni: Hugging Face (full model) <-> MindSpeed-MM checkpoints (thinker: vision, audio, LLM).", family="qwen2_5_omni")

CONVERTERS = [Qwen2_5_VLConverter, Qwen2_5_OmniConverter]
