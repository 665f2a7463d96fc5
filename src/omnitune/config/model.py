"""model.json (every key: docs/reference.md): which family, which modules are frozen, per-module settings.

Structure sizes come from the HF config.json. MindSpeed-MM's model.json repeats many of them
(num_layers, hidden_size, ...): we accept those keys and check them against config.json, so a
model.json written for another size fails loudly instead of being silently ignored. Keys that only
steer Megatron kernels (fused rope, params_dtype, ...) are accepted and have no effect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from omnitune.config.errors import ConfigError, load_json_model

# Megatron/MindSpeed per-module keys that describe structure or kernels. Accepted; sizes among them
# are checked against config.json by the model family (structure_sizes).
STRUCTURE_KEYS = {
    "model_id", "num_layers", "hidden_size", "ffn_hidden_size", "llm_hidden_size", "num_attention_heads",
    "hidden_dropout", "attention_dropout", "in_channels", "patch_size", "spatial_merge_size",
    "temporal_patch_size", "layernorm_epsilon", "normalization", "fp16", "bf16", "params_dtype",
    "activation_func", "use_fused_rotary_pos_emb", "post_layer_norm", "attention_mask_type",
    "gated_linear_unit", "bias_activation_fusion", "add_bias_linear", "input_size", "kv_channels",
    "max_position_embeddings", "vocab_size", "rope_theta", "untie_embeddings_and_output_weights",
    "disable_bias_linear", "init_method_std", "position_embedding_type", "attention_softmax_in_fp32",
    "parallel_output", "group_query_attention", "num_query_groups", "mrope_section", "rope_scaling",
    "add_qkv_bias", "window_size", "fullatt_block_indexes", "out_hidden_size", "num_experts",
    "moe_intermediate_size", "num_experts_per_tok", "head_dim", "qk_layernorm",
    # further keys of the seeds' model.json files (Qwen2.5-VL/Omni, Qwen3-VL, Qwen3-Omni)
    "seq_length", "intermediate_size", "tokens_per_second", "window_attn_size", "d_model", "num_mel_bins",
    "max_source_positions", "n_window", "scale_embedding", "output_dim", "attn_layout",
    "synchronize_per_layer", "is_causal",
}


class ModuleConfig(BaseModel):
    """Settings of one module (vision encoder, projector, audio encoder, text decoder)."""
    model_config = ConfigDict(extra="allow")

    freeze: bool = Field(False, description="no gradient and no optimizer state for the module")
    pipeline_num_layers: list[int] | list[list[int]] | None = Field(None,
        description="layers per pipeline stage (with VPP: one list per chunk); must sum to the module's layers")
    recompute_granularity: Literal["full", "selective"] | None = Field(None,
        description="full: activation checkpointing of the module's layers; selective is refused")
    recompute_method: Literal["uniform", "block"] | None = Field(None,
        description="uniform (every layer) or block (the first recompute_num_layers)")
    recompute_num_layers: int | None = Field(None, description="layers recomputed with block (>= 1)")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(None,
        description="eager, sdpa or flash_attention_2 (needs the flash-attn package)")
    activation_offload: bool = Field(False, description="activations saved for backward live in host memory")
    use_npu_fused_moe: bool = Field(False, description="MoE experts through one grouped GEMM")
    tp: int | None = Field(None, description="per-module hetero TP size; only 1 (sizes go on image_encoder / "
                                             "audio_encoder)")
    pp: int | None = Field(None, description="per-module hetero PP size; only 1")
    cp: int | None = Field(None, description="per-module hetero CP size; only 1")

    def structure(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ImageEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vision_encoder: ModuleConfig | None = Field(None, description="the vision tower's settings")
    vision_projector: ModuleConfig | None = Field(None, description="the vision merger's settings")
    # hetero parallel sizes of the whole encoder (seed Qwen2.5-Omni model_7b.json)
    tp: int | None = Field(None, description="with --hetero-parallel: 1 (data-parallel over the LLM's TP group) "
                                             "or the LLM's TP")
    pp: int | None = Field(None, description="with --hetero-parallel: 1 only")
    cp: int | None = Field(None, description="with --hetero-parallel: 1 only")


class AudioEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audio_encoder: ModuleConfig | None = Field(None, description="the audio encoder's settings")
    tp: int | None = Field(None, description="with --hetero-parallel: 1 (data-parallel over the LLM's TP group) "
                                             "or the LLM's TP")
    pp: int | None = Field(None, description="with --hetero-parallel: 1 only")
    cp: int | None = Field(None, description="with --hetero-parallel: 1 only")


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    compute_mode: Literal["default", "chunk", "dynamic_chunk"] = Field("default",
        description="default, or chunk / dynamic_chunk: lm_head + cross-entropy per chunk of trained positions")
    chunk_size: int | None = Field(None,
        description="trained positions per chunk (needed with chunk / dynamic_chunk)")
    loss_type: Literal["default", "per_sample_loss", "per_token_loss"] = Field("default",
        description="default, per_sample_loss or per_token_loss (see Loss types)")
    router_aux_loss_coef: float = Field(0.0, description="weight of the MoE routers' load-balancing loss (>= 0)")


class ModelJson(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(description="model family id; must match the HF folder's config.json")
    img_context_token_id: int | None = Field(None, description="accepted (the ids come from the tokenizer)")
    video_token_id: int | None = Field(None, description="accepted (the ids come from the tokenizer)")
    vision_start_token_id: int | None = Field(None, description="accepted (the ids come from the tokenizer)")
    init_from_hf_path: str | None = Field(None,
        description="the original HF folder (weights when --load is not given; config, processor)")
    image_encoder: ImageEncoderConfig | None = None
    audio_encoder: AudioEncoderConfig | None = Field(None, description="the audio encoder's settings")
    text_decoder: ModuleConfig | None = None
    text_encoder: None = Field(None, description="must be null")
    video_encoder: None = Field(None, description="must be null")
    loss_cfg: LossConfig = LossConfig()
    #: MindSpeed-MM runtime patch switches (e.g. clip_grad_async, hetero_parallel_cp): accepted, no effect
    patch: dict[str, Any] | None = Field(None, description="MindSpeed-MM runtime patch switches: accepted, no effect")

    @field_validator("model_id")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from omnitune.models.registry import family_for_model_id
        family_for_model_id(v)  # raises with the supported list
        return v

    def modules(self) -> dict[str, ModuleConfig]:
        """model.json path -> settings, for the modules present."""
        out: dict[str, ModuleConfig] = {}
        if self.image_encoder:
            for k in ("vision_encoder", "vision_projector"):
                m = getattr(self.image_encoder, k)
                if m is not None:
                    out[f"image_encoder.{k}"] = m
        if self.audio_encoder and self.audio_encoder.audio_encoder is not None:
            out["audio_encoder.audio_encoder"] = self.audio_encoder.audio_encoder
        if self.text_decoder is not None:
            out["text_decoder"] = self.text_decoder
        return out


def load_model_json(path: str | Path) -> ModelJson:
    p = Path(path)
    cfg = load_json_model(p, ModelJson, "--mm-model")
    for name, mod in cfg.modules().items():
        unknown = sorted(set(mod.structure()) - STRUCTURE_KEYS)
        if unknown:
            raise ConfigError(f"{p}: {name}.{unknown[0]}: unknown key; remove or fix it (model.json accepts the "
                              f"keys listed in docs/reference.md, MindSpeed-MM's structure keys among them)")
    return cfg


def check_against_hf_config(cfg: ModelJson, family, hf_config, source: str) -> None:
    """model.json sizes, where given, must equal config.json's."""
    sizes = family.structure_sizes(hf_config)
    modules = cfg.modules()
    for key, actual in sizes.items():
        mod_path, _, field = key.rpartition(".")
        mod = modules.get(mod_path)
        if mod is None:
            continue
        given = mod.structure().get(field)
        if given is not None and given != actual:
            raise ConfigError(
                f"{source}: {key} = {given} but the HF config.json says {actual}. Structure comes from "
                f"config.json; fix or remove the key in model.json.")
    for name, mod in modules.items():
        if mod.pipeline_num_layers is not None:
            total = sum(x for v in mod.pipeline_num_layers for x in (v if isinstance(v, list) else [v]))
            n = sizes.get(f"{name}.num_layers")
            if n is not None and total != n:
                raise ConfigError(f"{source}: {name}.pipeline_num_layers sums to {total} but the model has "
                                  f"{n} layers")


# Per-module settings: recompute, offload, fused MoE and attention are implemented (train/model.py,
# ops/); here only what cannot work is refused, before launch.
_HETERO = ("tp", "pp", "cp")  # per-module parallel sizes: 1 is what we run; more is hetero parallel


def unsupported_settings(cfg: ModelJson) -> list[str]:
    out = []
    for name, mod in cfg.modules().items():
        out.extend(_module_setting_problems(name, mod))
    # image_encoder / audio_encoder tp / pp / cp are checked against the flags (parallel/hetero.py);
    # per-module sizes are not a seed setting
    for name, mod in cfg.modules().items():
        for key in _HETERO:
            if (getattr(mod, key, None) or 1) > 1:
                out.append(f"{name}.{key} = {getattr(mod, key)}: per-module parallel sizes are not implemented; "
                           f"set 1 or remove it (hetero sizes go on image_encoder / audio_encoder, with "
                           f"--hetero-parallel)")
    lc = cfg.loss_cfg
    if lc.compute_mode != "default" and (lc.chunk_size is None or lc.chunk_size < 1):
        out.append(f"loss_cfg.compute_mode {lc.compute_mode!r} needs loss_cfg.chunk_size >= 1 (trained positions "
                   f"per chunk, e.g. 1024)")
    if lc.router_aux_loss_coef < 0:
        out.append("loss_cfg.router_aux_loss_coef must be >= 0")
    return out


def _module_setting_problems(name: str, mod: ModuleConfig) -> list[str]:
    out = []
    if mod.recompute_granularity == "selective":
        out.append(f"{name}.recompute_granularity 'selective' (core attention only) is not implemented; use "
                   f"'full' or remove it")
    if mod.recompute_granularity is None and (mod.recompute_method or mod.recompute_num_layers):
        out.append(f"{name}.recompute_method / recompute_num_layers need {name}.recompute_granularity 'full'")
    if mod.recompute_num_layers is not None and mod.recompute_num_layers < 1:
        out.append(f"{name}.recompute_num_layers must be >= 1")
    if mod.recompute_method == "block" and mod.recompute_num_layers is None:
        out.append(f"{name}.recompute_method 'block' needs {name}.recompute_num_layers (how many of the first "
                   f"layers to recompute)")
    if mod.attn_implementation == "flash_attention_2":
        from omnitune.ops.attention import flash_attn_available
        if not flash_attn_available():
            out.append(f"{name}.attn_implementation 'flash_attention_2' needs the flash-attn package (and a GPU), "
                       f"which is not installed here; use 'sdpa' or 'eager'")
    return out
