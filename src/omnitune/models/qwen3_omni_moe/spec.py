"""Qwen3-Omni (MoE): everything omnitune knows that is specific to this family.

An HF folder holds the FULL model (Qwen3OmniMoeForConditionalGeneration: thinker + talker +
code2wav, keys ``thinker.*`` / ``talker.*`` / ``code2wav.*``). omnitune trains the thinker
(Qwen3OmniMoeThinkerForConditionalGeneration: model.visual (Qwen3-VL style, DeepStack),
model.audio_tower, model.language_model (MoE), lm_head); talker and vocoder are carried through.

The real tokenizer appends audio/TTS special tokens to the Qwen3 vocabulary: 151669
``<|audio_start|>``, 151670 ``<|audio_end|>``, 151671..151674 TTS tokens, 151675 ``<|audio_pad|>``.
"""
from __future__ import annotations

from torch import nn

from omnitune.models.base import QWEN_TEXT_LORA, ModelFamily, ModuleGroup, lora_map, omni_rope_index, text_sizes
from omnitune.models.qwen3_vl.spec import CHAT_TEMPLATE as QWEN3_VL_CHAT_TEMPLATE
from omnitune.models.qwen3_vl.spec import interleaved_mrope_section

# Qwen3-Omni-30B-A3B-Instruct's chat template: Qwen3-VL-Instruct's template (tools, system,
# tool_response) with the audio branch ``<|audio_start|><|audio_pad|><|audio_end|>`` in user and
# tool content. NOTE: reconstructed (the byte-exact original was not available offline); the
# rendering of text / image / video / audio turns is the real one.
_AUDIO_BRANCH = (
    "                {%- elif content.type == 'audio' or 'audio' in content or 'audio_url' in content %}\n"
    "                    {%- set audio_count.value = audio_count.value + 1 %}\n"
    "                    {%- if add_audio_id %}Audio {{ audio_count.value }}: {% endif -%}\n"
    "                    <|audio_start|><|audio_pad|><|audio_end|>\n")
CHAT_TEMPLATE = (QWEN3_VL_CHAT_TEMPLATE
                 .replace("{%- set video_count = namespace(value=0) %}\n",
                          "{%- set video_count = namespace(value=0) %}\n{%- set audio_count = namespace(value=0) %}\n")
                 .replace("                {%- elif 'text' in content %}\n",
                          _AUDIO_BRANCH + "                {%- elif 'text' in content %}\n"))

VOCAB = 152064           # real Qwen3-Omni thinker embedding rows
ADDED_TOKENS = {151669: "<|audio_start|>", 151670: "<|audio_end|>", 151671: "<tts_pad>",
                151672: "<tts_text_bos>", 151673: "<tts_text_eod>", 151674: "<tts_text_bos_single>",
                151675: "<|audio_pad|>"}
TOKENS = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", audio_token="<|audio_pad|>",
              vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
              audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>")
IDS = dict(audio_token_id=151675, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
           vision_end_token_id=151653, audio_start_token_id=151669, audio_end_token_id=151670,
           user_token_id=872, position_id_per_seconds=13)
TEXT_IDS = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
TOP_IDS = dict(im_start_token_id=151644, im_end_token_id=151645, tts_pad_token_id=151671,
               tts_bos_token_id=151672, tts_eos_token_id=151673, system_token_id=8948, user_token_id=872,
               assistant_token_id=77091)
CODEC_IDS = dict(codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_nothink_id=2155,
                 codec_think_bos_id=2156, codec_think_eos_id=2157)

SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, head_dim=16, experts=4, topk=2, moe_inter=32,
                 vdepth=2, vdim=64, vinter=128, vheads=4, deepstack=[0, 1], adepth=2, adim=64, aheads=4,
                 ainter=128),
    "bench": dict(hidden=256, layers=4, heads=8, kv=2, head_dim=32, experts=8, topk=2, moe_inter=128,
                  vdepth=4, vdim=128, vinter=256, vheads=4, deepstack=[1, 2], adepth=4, adim=128, aheads=4,
                  ainter=256),
}


class Qwen3OmniMoeFamily(ModelFamily):
    name = "qwen3_omni_moe"
    model_ids = ("qwen3_omni_moe",)
    template = "qwen3_omni"
    hf_class_name = "Qwen3OmniMoeThinkerForConditionalGeneration"
    hf_config_class_name = "Qwen3OmniMoeConfig"
    #: ViT blocks (fused qkv, proj, linear_fc1/2), merger MLPs (mlp.0 / mlp.2), audio encoder layers;
    #: the MoE text decoder: attention only (its experts are fused tensors, not Linear modules)
    lora_target_map = lora_map(QWEN_TEXT_LORA, {
        "linear_qkv": (r"attn\.qkv",), "linear_proj": (r"attn\.proj",),
        "linear_fc1": (r"mlp\.linear_fc1", r"mlp\.0"), "linear_fc2": (r"mlp\.linear_fc2", r"mlp\.2")}, {
    "linear_proj": (r"self_attn\.out_proj",), "linear_fc1": (r"layers\.\d+\.fc1",),
        "linear_fc2": (r"layers\.\d+\.fc2",)})
    hf_full_class_name = "Qwen3OmniMoeForConditionalGeneration"
    folder_prefix = "thinker."
    forward_batch_keys = ("video_second_per_grid", "use_audio_in_video")

    def rope_index(self, model: nn.Module, sub: dict):
        return omni_rope_index(model, sub)
    # DeepStack (as Qwen3-VL): one row per True of visual_pos_masks
    cp_masked_rows = {"deepstack_visual_embeds": "visual_pos_masks"}

    # ------------------------------------------------------------------ configs
    def tiny_config(self, size: str = "tiny"):
        s = SIZES[size]
        from transformers import Qwen3OmniMoeThinkerConfig

        return Qwen3OmniMoeThinkerConfig(
            text_config=dict(
                vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=2 * s["hidden"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                head_dim=s["head_dim"], num_experts=s["experts"], num_experts_per_tok=s["topk"],
                moe_intermediate_size=s["moe_inter"], decoder_sparse_step=1, norm_topk_prob=True,
                max_position_embeddings=65536, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "interleaved": True,
                                 "mrope_interleaved": True,
                                 "mrope_section": interleaved_mrope_section(s["head_dim"])},
                **TEXT_IDS,
            ),
            vision_config=dict(depth=s["vdepth"], hidden_size=s["vdim"], intermediate_size=s["vinter"],
                               num_heads=s["vheads"], out_hidden_size=s["hidden"], patch_size=16,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                               num_position_embeddings=64, deepstack_visual_indexes=s["deepstack"]),
            audio_config=dict(num_mel_bins=128, encoder_layers=s["adepth"], encoder_attention_heads=s["aheads"],
                              encoder_ffn_dim=s["ainter"], d_model=s["adim"], output_dim=s["hidden"],
                              n_window=50, n_window_infer=800, conv_chunksize=500, downsample_hidden_size=32,
                              max_source_positions=1500),
            tie_word_embeddings=False,
            **IDS,
        )

    def trainable_config(self, config):
        return getattr(config, "thinker_config", config)

    def tiny_folder_config(self, size: str = "tiny"):
        from transformers import Qwen3OmniMoeConfig

        s = SIZES[size]
        thinker = self.tiny_config(size)
        groups = 4
        talker = dict(
            text_config=dict(vocab_size=3072, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             decoder_sparse_step=1, rms_norm_eps=1e-6, max_position_embeddings=65536,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "interleaved": True,
                                              "mrope_section": interleaved_mrope_section(16)}),
            code_predictor_config=dict(vocab_size=2048, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, num_code_groups=groups, rms_norm_eps=1e-6),
            num_code_groups=groups, thinker_hidden_size=s["hidden"], accept_hidden_layer=s["layers"] - 1,
            spatial_merge_size=2, speaker_id={"chelsie": 2301, "ethan": 2302, "aiden": 2303},
            **{k: v for k, v in IDS.items() if k not in ("user_token_id", "vision_end_token_id")},
            **CODEC_IDS,
        )
        code2wav = dict(codebook_size=2048, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=64, num_hidden_layers=2, num_quantizers=groups, decoder_dim=32,
                        upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], sliding_window=72)
        return Qwen3OmniMoeConfig(thinker_config=thinker.to_dict(), talker_config=talker,
                                  code2wav_config=code2wav, enable_audio_output=True, **TOP_IDS)

    def init_tiny_model(self, model: nn.Module, generator) -> None:
        """transformers 5.23 never initialises the talker's fused expert weights
        (Qwen3OmniMoeTalkerTextExperts: torch.empty) -> normal(0, initializer_range) like the thinker's."""
        import torch

        std = model.config.talker_config.text_config.initializer_range
        with torch.no_grad():
            for mod in model.talker.modules():
                if type(mod).__name__ == "Qwen3OmniMoeTalkerTextExperts":
                    for p in mod.parameters(recurse=False):
                        p.copy_(torch.randn(p.shape, generator=generator) * std)

    # ------------------------------------------------------------------ processor
    def build_processor(self, load_tokenizer):
        from transformers import (Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor,
                                  WhisperFeatureExtractor)

        tok = load_tokenizer(extra_special_tokens=TOKENS, added_tokens=ADDED_TOKENS)
        norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        ip = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=16,
                                   merge_size=2, temporal_patch_size=2, **norm)
        vp = Qwen2VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, **norm)
        fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300,
                                     n_fft=400, padding_value=0.0, return_attention_mask=True)
        return Qwen3OmniMoeProcessor(image_processor=ip, video_processor=vp, feature_extractor=fe, tokenizer=tok,
                                     chat_template=CHAT_TEMPLATE)

    # ------------------------------------------------------------------ structure
    def module_groups(self) -> list[ModuleGroup]:
        return [
            ModuleGroup("image_encoder.vision_encoder", ("model.visual",),
                        exclude=("model.visual.merger", "model.visual.merger_list")),
            ModuleGroup("image_encoder.vision_projector", ("model.visual.merger", "model.visual.merger_list")),
            ModuleGroup("audio_encoder.audio_encoder", ("model.audio_tower",)),
            ModuleGroup("text_decoder", ("model.language_model", "lm_head")),
        ]

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def audio_tower(self, model: nn.Module) -> nn.Module:
        return model.model.audio_tower

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        m = model.model
        return list(m.visual.blocks) + list(m.audio_tower.layers) + list(m.language_model.layers)

    def structure_sizes(self, config) -> dict[str, int]:
        config = self.trainable_config(config)
        t, v, a = config.text_config, config.vision_config, config.audio_config
        return {
            "image_encoder.vision_encoder.num_layers": v.depth,
            "image_encoder.vision_encoder.hidden_size": v.hidden_size,
            "image_encoder.vision_encoder.ffn_hidden_size": v.intermediate_size,
            "image_encoder.vision_encoder.num_attention_heads": v.num_heads,
            "image_encoder.vision_encoder.patch_size": v.patch_size,
            "image_encoder.vision_encoder.spatial_merge_size": v.spatial_merge_size,
            "image_encoder.vision_encoder.temporal_patch_size": v.temporal_patch_size,
            "image_encoder.vision_encoder.in_channels": v.in_channels,
            "image_encoder.vision_encoder.out_hidden_size": v.out_hidden_size,
            "image_encoder.vision_encoder.llm_hidden_size": t.hidden_size,
            "image_encoder.vision_projector.input_size": v.hidden_size,
            "image_encoder.vision_projector.hidden_size": v.out_hidden_size,
            "audio_encoder.audio_encoder.num_layers": a.encoder_layers,
            "audio_encoder.audio_encoder.hidden_size": a.d_model,
            "audio_encoder.audio_encoder.ffn_hidden_size": a.encoder_ffn_dim,
            "audio_encoder.audio_encoder.num_attention_heads": a.encoder_attention_heads,
            "audio_encoder.audio_encoder.llm_hidden_size": a.output_dim,
            **text_sizes(t),
        }


SPEC = Qwen3OmniMoeFamily()
