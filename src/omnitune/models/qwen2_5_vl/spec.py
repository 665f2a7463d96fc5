"""Qwen2.5-VL: everything omnitune knows that is specific to this family.

Same layout as Qwen2-VL (model.visual / model.language_model / lm_head); the vision tower differs
(window attention with full-attention blocks, SwiGLU MLP, RMSNorm, ``out_hidden_size`` projector) and
videos carry ``second_per_grid_ts`` for the temporal rope positions.
"""
from __future__ import annotations

from torch import nn

from omnitune.models.base import QWEN_TEXT_LORA, ModuleGroup, lora_map, text_sizes
from omnitune.models.qwen2_vl.spec import CHAT_TEMPLATE as _QWEN2_VL_CHAT_TEMPLATE
from omnitune.models.qwen2_vl.spec import Qwen2VLFamily

# The real Qwen2.5-VL-*-Instruct chat template is byte-identical to Qwen2-VL-*-Instruct's.
CHAT_TEMPLATE = _QWEN2_VL_CHAT_TEMPLATE

VOCAB = 151936           # real Qwen2.5-VL-3B embedding rows (7B: 152064)
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
           vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
TOKENS = dict(image_token="<|image_pad|>", video_token="<|video_pad|>",
              vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")

SIZES = {
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vdepth=2, vdim=64, vinter=128, vheads=4,
                 fullatt=[1]),
    "bench": dict(hidden=256, inter=1024, layers=4, heads=8, kv=2, vdepth=4, vdim=128, vinter=256, vheads=4,
                  fullatt=[1, 3]),
}


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim // 2 rotary pairs into (t, h, w) like the real 16/24/24 of 128."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


class Qwen2_5VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_ids = ("qwen2_5vl",)
    template = "qwen2vl"
    hf_class_name = "Qwen2_5_VLForConditionalGeneration"
    hf_config_class_name = "Qwen2_5_VLConfig"
    #: ViT blocks (fused qkv, proj; gated MLP: the text decoder's names) and the merger MLP
    lora_target_map = lora_map(QWEN_TEXT_LORA, {
        "linear_qkv": (r"attn\.qkv",), "linear_proj": (r"attn\.proj",),
        "linear_fc1": (r"merger\.mlp\.0",), "linear_fc2": (r"merger\.mlp\.2",)})
    # videos' seconds per temporal grid step feed the temporal rope positions
    forward_batch_keys = ("mm_token_type_ids", "second_per_grid_ts")
    rope_index_keys = ("second_per_grid_ts",)

    def tiny_config(self, size: str = "tiny"):
        s = SIZES[size]
        return self.config_class()(
            text_config=dict(
                vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv"], max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=True, bos_token_id=IDS["bos_token_id"],
                eos_token_id=IDS["eos_token_id"], pad_token_id=IDS["pad_token_id"],
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": mrope_section(s["hidden"] // s["heads"])},
            ),
            vision_config=dict(depth=s["vdepth"], hidden_size=s["vdim"], intermediate_size=s["vinter"],
                               num_heads=s["vheads"], out_hidden_size=s["hidden"], patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                               window_size=112, fullatt_block_indexes=s["fullatt"], tokens_per_second=2),
            tie_word_embeddings=True,
            **{k: IDS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id")},
        )

    def build_processor(self, load_tokenizer):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        tok = load_tokenizer(extra_special_tokens=TOKENS)
        # the real preprocessor_config.json: min_pixels 3136, max_pixels 12845056
        ip = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280 * 16},
                                   patch_size=14, merge_size=2, temporal_patch_size=2)
        vp = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
        return Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                   chat_template=CHAT_TEMPLATE)

    def module_groups(self) -> list[ModuleGroup]:
        return [
            ModuleGroup("image_encoder.vision_encoder", ("model.visual",), exclude=("model.visual.merger",)),
            ModuleGroup("image_encoder.vision_projector", ("model.visual.merger",)),
            ModuleGroup("text_decoder", ("model.language_model", "lm_head")),
        ]

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.visual.blocks) + list(model.model.language_model.layers)

    def structure_sizes(self, config) -> dict[str, int]:
        t, v = config.text_config, config.vision_config
        return {
            "image_encoder.vision_encoder.num_layers": v.depth,
            "image_encoder.vision_encoder.hidden_size": v.hidden_size,
            "image_encoder.vision_encoder.ffn_hidden_size": v.intermediate_size,
            "image_encoder.vision_encoder.num_attention_heads": v.num_heads,
            "image_encoder.vision_encoder.patch_size": v.patch_size,
            "image_encoder.vision_encoder.spatial_merge_size": v.spatial_merge_size,
            "image_encoder.vision_encoder.temporal_patch_size": v.temporal_patch_size,
            "image_encoder.vision_encoder.in_channels": v.in_channels,
            "image_encoder.vision_encoder.window_size": v.window_size,
            "image_encoder.vision_encoder.out_hidden_size": v.out_hidden_size,
            "image_encoder.vision_encoder.llm_hidden_size": t.hidden_size,
            "image_encoder.vision_projector.input_size": v.hidden_size,
            "image_encoder.vision_projector.hidden_size": v.out_hidden_size,
            **text_sizes(t),
        }


SPEC = Qwen2_5VLFamily()
