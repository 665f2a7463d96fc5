"""Qwen2.5-Omni: everything omnitune knows that is specific to this family.

An HF folder holds the FULL model (Qwen2_5OmniForConditionalGeneration: thinker + talker +
token2wav, keys ``thinker.*`` / ``talker.*`` / ``token2wav.*``). omnitune trains the thinker
(Qwen2_5OmniThinkerForConditionalGeneration: model.visual, model.audio_tower, model.language_model,
lm_head); the talker and vocoder are carried through untouched.

The tokenizer of the real checkpoint renames some Qwen special tokens: 151646 ``<|AUDIO|>``,
151647 ``<|audio_bos|>``, 151648 ``<|audio_eos|>``, 151652 ``<|vision_bos|>``, 151653
``<|vision_eos|>``, 151655 ``<|IMAGE|>``, 151656 ``<|VIDEO|>``.
"""
from __future__ import annotations

from torch import nn

from omnitune.models.base import QWEN_TEXT_LORA, ModelFamily, ModuleGroup, lora_map, omni_rope_index, text_sizes
from omnitune.models.qwen2_5_vl.spec import mrope_section

# The real Qwen2.5-Omni-7B chat template.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPEAKERS_FILE = "spk_dict.pt"   # speaker table of the full model, copied untouched on export
VOCAB = 151936           # real Qwen2.5-Omni-3B thinker embedding rows (7B: 152064)
# id -> text of the special tokens the Qwen2.5-Omni tokenizer renames
RENAMED_TOKENS = {151646: "<|AUDIO|>", 151647: "<|audio_bos|>", 151648: "<|audio_eos|>",
                  151652: "<|vision_bos|>", 151653: "<|vision_eos|>", 151655: "<|IMAGE|>", 151656: "<|VIDEO|>"}
TOKENS = dict(image_token="<|IMAGE|>", video_token="<|VIDEO|>", audio_token="<|AUDIO|>",
              vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
              audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
IDS = dict(audio_token_index=151646, image_token_index=151655, video_token_index=151656,
           vision_start_token_id=151652, vision_end_token_id=151653, audio_start_token_id=151647,
           audio_end_token_id=151648, user_token_id=872, position_id_per_seconds=25, seconds_per_chunk=2)
TEXT_IDS = dict(bos_token_id=151644, eos_token_id=151645, pad_token_id=151643)

SIZES = {
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vdepth=2, vdim=64, vinter=128, vheads=4,
                 fullatt=[1], adepth=2, adim=64, aheads=4, ainter=128, talker_hidden=64, talker_layers=2),
    "bench": dict(hidden=256, inter=1024, layers=4, heads=8, kv=2, vdepth=4, vdim=128, vinter=256, vheads=4,
                  fullatt=[1, 3], adepth=4, adim=128, aheads=4, ainter=256, talker_hidden=64, talker_layers=2),
}


class Qwen2_5OmniFamily(ModelFamily):
    name = "qwen2_5_omni"
    model_ids = ("qwen2_5_omni",)
    #: MindSpeed-MM's examples/qwen2.5omni/model_7b.json says "qwen2_5vl"; accepted with an Omni folder
    legacy_model_ids = ("qwen2_5vl",)
    template = "qwen2_omni"
    hf_class_name = "Qwen2_5OmniThinkerForConditionalGeneration"
    hf_config_class_name = "Qwen2_5OmniConfig"
    #: ViT blocks (separate q/k/v, proj; gated MLP), merger MLP, audio encoder layers (q/k/v_proj,
    #: out_proj, fc1/fc2) besides the text decoder
    lora_target_map = lora_map(QWEN_TEXT_LORA, {
        "linear_qkv": (r"attn\.[qkv]",), "linear_proj": (r"attn\.proj",),
        "linear_fc1": (r"merger\.mlp\.0",), "linear_fc2": (r"merger\.mlp\.2",)}, {
    "linear_proj": (r"self_attn\.out_proj",), "linear_fc1": (r"layers\.\d+\.fc1",),
        "linear_fc2": (r"layers\.\d+\.fc2",)})
    hf_full_class_name = "Qwen2_5OmniForConditionalGeneration"
    folder_prefix = "thinker."
    folder_extra_files = ("spk_dict.pt",)
    # time-aligned rope (TMRoPE): seconds per video grid step; audio interleaved in videos
    forward_batch_keys = ("video_second_per_grid", "use_audio_in_video")

    def rope_index(self, model: nn.Module, sub: dict):
        return omni_rope_index(model, sub)

    # ------------------------------------------------------------------ configs
    def tiny_config(self, size: str = "tiny"):
        s = SIZES[size]
        from transformers import Qwen2_5OmniThinkerConfig

        return Qwen2_5OmniThinkerConfig(
            text_config=dict(
                vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": mrope_section(s["hidden"] // s["heads"])},
                **TEXT_IDS,
            ),
            vision_config=dict(depth=s["vdepth"], hidden_size=s["vdim"], intermediate_size=s["vinter"],
                               num_heads=s["vheads"], out_hidden_size=s["hidden"], patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                               fullatt_block_indexes=s["fullatt"]),
            audio_config=dict(num_mel_bins=128, encoder_layers=s["adepth"], encoder_attention_heads=s["aheads"],
                              encoder_ffn_dim=s["ainter"], d_model=s["adim"], output_dim=s["hidden"],
                              n_window=100, max_source_positions=1500),
            tie_word_embeddings=False,
            **IDS,
        )

    def trainable_config(self, config):
        return getattr(config, "thinker_config", config)

    def tiny_folder_config(self, size: str = "tiny"):
        from transformers import Qwen2_5OmniConfig

        s = SIZES[size]
        thinker = self.tiny_config(size)
        th = s["talker_hidden"]
        talker = dict(
            vocab_size=8448, embedding_size=s["hidden"], hidden_size=th, intermediate_size=2 * th,
            num_hidden_layers=s["talker_layers"], num_attention_heads=4, num_key_value_heads=2, head_dim=th // 4,
            max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(th // 4)},
            spatial_merge_size=2,
            **{k: v for k, v in IDS.items() if k != "user_token_id"},
        )
        token2wav = dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2,
                            emb_dim=32, block_size=24, look_ahead_layers=[1], look_backward_layers=[0],
                            num_embeds=8193, mel_dim=80, enc_emb_dim=32, enc_dim=32,
                            enc_channels=[32, 32, 32, 32, 96], enc_kernel_sizes=[5, 3, 3, 3, 1],
                            enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=16, enc_se_channels=16),
            bigvgan_config=dict(mel_dim=80, upsample_initial_channel=64, resblock_kernel_sizes=[3],
                                resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[5, 3, 2, 2, 2, 2],
                                upsample_kernel_sizes=[11, 7, 4, 4, 4, 4]),
        )
        return Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), talker_config=talker,
                                 token2wav_config=token2wav, enable_audio_output=True)

    def tiny_folder_extras(self, folder, config, generator) -> None:
        """spk_dict.pt: the speakers Qwen2_5OmniForConditionalGeneration.from_pretrained requires
        (per speaker: talker text bos token, ECAPA conditioning vector, reference mel)."""
        import torch

        dit = config.token2wav_config.dit_config
        speakers = {}
        for name, bos in (("Chelsie", 151870), ("Ethan", 151872)):
            speakers[name] = {"bos_token": bos,
                              "cond": torch.randn(1, dit.enc_emb_dim, generator=generator),
                              "ref_mel": torch.randn(1, 32, dit.mel_dim, generator=generator)}
        torch.save(speakers, folder / SPEAKERS_FILE)

    # ------------------------------------------------------------------ processor
    def build_processor(self, load_tokenizer):
        from transformers import (Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                                  WhisperFeatureExtractor)

        tok = load_tokenizer(extra_special_tokens=TOKENS, added_tokens=RENAMED_TOKENS)
        ip = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280 * 16},
                                   patch_size=14, merge_size=2, temporal_patch_size=2)
        vp = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
        fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300,
                                     n_fft=400, padding_value=0.0, return_attention_mask=True)
        return Qwen2_5OmniProcessor(image_processor=ip, video_processor=vp, feature_extractor=fe, tokenizer=tok,
                                    chat_template=CHAT_TEMPLATE)

    # ------------------------------------------------------------------ structure
    def module_groups(self) -> list[ModuleGroup]:
        return [
            ModuleGroup("image_encoder.vision_encoder", ("model.visual",), exclude=("model.visual.merger",)),
            ModuleGroup("image_encoder.vision_projector", ("model.visual.merger",)),
            ModuleGroup("audio_encoder.audio_encoder", ("model.audio_tower",)),
            ModuleGroup("text_decoder", ("model.language_model", "lm_head")),
        ]

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def unused_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        # audio_tower.audio_bos_eos_token: an nn.Embedding(2, d) no forward of transformers 5.23 reads
        return [model.model.audio_tower.audio_bos_eos_token.weight]

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
            "image_encoder.vision_encoder.window_size": v.window_size,
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


SPEC = Qwen2_5OmniFamily()
