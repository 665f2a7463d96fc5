"""Qwen2-VL: everything omnitune knows that is specific to this family."""
from __future__ import annotations

from torch import nn

from omnitune.models.base import QWEN_TEXT_LORA, ModelFamily, ModuleGroup, lora_map

# The real Qwen2-VL-*-Instruct chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VOCAB = 151936           # real Qwen2-VL-2B embedding rows
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
           vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)

SIZES = {
    # hidden 64, 2 layers: unit tests and `make demo`
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vdepth=2, vdim=64, vheads=4),
    # ~20-50M parameters (most of it the 152k x 256 tied embedding): bench/
    "bench": dict(hidden=256, inter=1024, layers=4, heads=8, kv=2, vdepth=4, vdim=128, vheads=4),
}


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    model_ids = ("qwen2vl",)
    template = "qwen2vl"
    hf_class_name = "Qwen2VLForConditionalGeneration"
    hf_config_class_name = "Qwen2VLConfig"
    #: ViT blocks (fused qkv, proj, fc1/fc2) and the merger MLP (mlp.0 / mlp.2) besides the text decoder
    lora_target_map = lora_map(QWEN_TEXT_LORA, {
        "linear_qkv": (r"attn\.qkv",), "linear_proj": (r"attn\.proj",),
        "linear_fc1": (r"mlp\.fc1", r"merger\.mlp\.0"), "linear_fc2": (r"mlp\.fc2", r"merger\.mlp\.2")})

    def tiny_config(self, size: str = "tiny"):
        s = SIZES[size]
        head_dim = s["hidden"] // s["heads"]
        # mrope sections sum to head_dim // 2 (Qwen2-VL: 16/24/24 of 64)
        half = head_dim // 2
        t = half // 4
        sec = [t, (half - t) // 2, half - t - (half - t) // 2]
        return self.config_class()(
            text_config=dict(
                vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv"], max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=True, bos_token_id=IDS["bos_token_id"],
                eos_token_id=IDS["eos_token_id"], pad_token_id=IDS["pad_token_id"],
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sec},
            ),
            vision_config=dict(depth=s["vdepth"], embed_dim=s["vdim"], hidden_size=s["hidden"],
                               mlp_ratio=2, num_heads=s["vheads"], patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, in_channels=3),
            tie_word_embeddings=True,
            **{k: IDS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id")},
        )

    def build_processor(self, load_tokenizer):
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        tok = load_tokenizer()
        ip = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
        vp = Qwen2VLVideoProcessor()
        return Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
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
            "image_encoder.vision_encoder.hidden_size": v.embed_dim,
            "image_encoder.vision_encoder.num_attention_heads": v.num_heads,
            "image_encoder.vision_encoder.patch_size": v.patch_size,
            "image_encoder.vision_encoder.spatial_merge_size": v.spatial_merge_size,
            "image_encoder.vision_encoder.temporal_patch_size": v.temporal_patch_size,
            "image_encoder.vision_encoder.in_channels": v.in_channels,
            "image_encoder.vision_encoder.llm_hidden_size": t.hidden_size,
            "image_encoder.vision_projector.input_size": v.embed_dim,
            "image_encoder.vision_projector.hidden_size": t.hidden_size,
            "text_decoder.num_layers": t.num_hidden_layers,
            "text_decoder.hidden_size": t.hidden_size,
            "text_decoder.ffn_hidden_size": t.intermediate_size,
            "text_decoder.num_attention_heads": t.num_attention_heads,
            "text_decoder.num_query_groups": t.num_key_value_heads,
            "text_decoder.vocab_size": t.vocab_size,
        }


SPEC = Qwen2VLFamily()
