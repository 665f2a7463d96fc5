"""What every model family provides, with the behaviour shared by the Qwen VL families.

A family folder (``models/<family>/spec.py``) subclasses :class:`ModelFamily` and fills in what is
family-specific: the HF class, tiny configs, how to build its processor, its module groups
(freeze / recompute) and its FSDP units. Shared code asks the family; it never tests model ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModuleGroup:
    """A named set of submodules that model.json settings (freeze, ...) apply to.

    ``paths`` are attribute paths from the HF top model (e.g. "model.visual.merger");
    ``exclude`` are paths inside them that belong to another group.
    """
    name: str            # model.json path, e.g. "image_encoder.vision_encoder"
    paths: tuple[str, ...]
    exclude: tuple[str, ...] = ()


#: LoRA target names of the seed scripts (Megatron's) -> regexes of HF module paths, each matched
#: against the END of a module's full name at a dot boundary ("self_attn\\.[qkv]_proj" matches
#: "model.language_model.layers.3.self_attn.q_proj"). The Qwen text decoders share these; a family
#: adds its vision tower / projector / audio encoder names with :func:`lora_map`.
QWEN_TEXT_LORA: dict[str, tuple[str, ...]] = {
    "linear_qkv": (r"self_attn\.[qkv]_proj",),
    "linear_proj": (r"self_attn\.o_proj",),
    "linear_fc1": (r"mlp\.(gate|up)_proj",),
    "linear_fc2": (r"mlp\.down_proj",),
}


def lora_map(*maps: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The union of several Megatron-name -> HF-path-regex maps (a family's LoRA target map)."""
    out: dict[str, tuple[str, ...]] = {}
    for m in maps:
        for k, pats in m.items():
            out[k] = out.get(k, ()) + tuple(pats)
    return out


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


class ModelFamily:
    #: model.json ``model_id`` values this family answers to
    model_ids: tuple[str, ...] = ()
    #: registry name (folder name)
    name: str = ""
    #: default data template
    template: str = ""
    #: transformers class name of the trainable model (Omni: the thinker)
    hf_class_name: str = ""
    #: transformers class name of the config.json in this family's HF folders (Omni: the full model's)
    hf_config_class_name: str = ""
    #: Omni: transformers class of the FULL model (thinker + talker + vocoder) that HF folders hold;
    #: "" when the folder holds the trainable model itself
    hf_full_class_name: str = ""
    #: Omni: key prefix of the trainable part inside the full folder ("thinker."), else ""
    folder_prefix: str = ""

    # ------------------------------------------------------------------ classes and configs
    def model_class(self):
        import transformers
        return getattr(transformers, self.hf_class_name)

    def config_class(self):
        import transformers
        return getattr(transformers, self.hf_config_class_name)

    def trainable_config(self, config):
        """The trainable model's config from a folder's config (Omni: ``thinker_config``)."""
        return config

    #: LoRA: Megatron target name -> HF module path regexes (see QWEN_TEXT_LORA); train/lora.py
    lora_target_map: dict[str, tuple[str, ...]] = QWEN_TEXT_LORA

    #: files of an HF folder besides config/weights/processor that export carries over untouched
    folder_extra_files: tuple[str, ...] = ()

    def load_pretrained(self, hf_dir, dtype=torch.float32) -> nn.Module:
        """The trainable model with its weights from an HF folder. Omni: only the thinker is built and
        only the ``thinker.*`` tensors are read from the full folder (talker/vocoder stay on disk)."""
        cls = self.model_class()
        if not self.folder_prefix:
            return cls.from_pretrained(hf_dir, dtype=dtype)
        import re

        from transformers import AutoConfig

        config = self.trainable_config(AutoConfig.from_pretrained(hf_dir, trust_remote_code=False))
        model, info = cls.from_pretrained(hf_dir, config=config, dtype=dtype, output_loading_info=True,
                                          key_mapping={"^" + re.escape(self.folder_prefix): ""})
        if info["missing_keys"] or info["mismatched_keys"]:
            bad = sorted(info["missing_keys"]) + [str(m) for m in info["mismatched_keys"]]
            raise ValueError(f"{hf_dir}: the {self.folder_prefix.rstrip('.')} weights are incomplete or of the "
                             f"wrong shape ({len(bad)} tensors, e.g. {bad[:3]}); is this a {self.hf_full_class_name} "
                             f"folder of this model size?")
        return model

    def folder_class(self):
        """transformers class of what an HF folder of this family holds (the full Omni model)."""
        import transformers
        return getattr(transformers, self.hf_full_class_name or self.hf_class_name)

    def tiny_config(self, size: str = "tiny"):
        """Config of the trainable model (the thinker for Omni)."""
        raise NotImplementedError

    def tiny_folder_config(self, size: str = "tiny"):
        """Config of the model a tiny HF folder holds (Omni: thinker + talker + vocoder)."""
        return self.tiny_config(size)

    def build_processor(self, load_tokenizer):
        raise NotImplementedError

    def init_tiny_model(self, model: nn.Module, generator: torch.Generator) -> None:
        """Initialise what the HF class leaves uninitialised (torch.empty) in a fresh tiny model."""

    def tiny_folder_extras(self, folder, config, generator) -> None:
        """Write the non-weight files a real folder of this family has besides config/weights/processor
        (Qwen2.5-Omni: spk_dict.pt). ``generator`` seeds any random content."""

    # ------------------------------------------------------------------ structure
    def module_groups(self) -> list[ModuleGroup]:
        raise NotImplementedError

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Submodules wrapped with their own ``fully_shard`` (blocks and decoder layers)."""
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def unused_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the HF forward never uses (they would never get a gradient, hence no optimizer
        state, which breaks optimizer-state save/load): frozen at load, kept as they are on export."""
        return []

    def audio_tower(self, model: nn.Module) -> nn.Module | None:
        """The audio encoder (Omni), None for families without audio."""
        return None

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder module (gets the merged embeddings; context parallelism splits its inputs)."""
        return model.model.language_model

    #: context parallelism: text-decoder kwargs holding one row per True position of a [B, S] mask
    #: kwarg (rows kwarg -> mask kwarg); each rank keeps the rows of its sequence chunk
    cp_masked_rows: dict[str, str] = {}

    def tp_plan(self, model: nn.Module) -> dict:
        """Tensor-parallel plan of ``model``: module path pattern -> style name(s) (parallel/tp.py),
        from ``tp_plan(model)`` in the family folder's tp.py."""
        import importlib

        return importlib.import_module(type(self).__module__.rsplit(".", 1)[0] + ".tp").tp_plan(model)

    def text_config(self, config):
        """The text decoder's config from the trainable model's or a folder's config."""
        config = self.trainable_config(config)
        return getattr(config, "text_config", config)

    def structure_sizes(self, config) -> dict[str, int]:
        """model.json key path -> size from config.json, for the consistency check."""
        return {}

    def parallel_sizes(self, config) -> dict[str, int]:
        """Sizes the parallel layout must divide (parallel/dims.py check_model), from a folder's or
        the trainable model's config: text heads / kv heads / vocab / experts, vision and audio heads."""
        t = self.text_config(config)
        tc = self.trainable_config(config)
        out = {"heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "vocab": t.vocab_size}
        if getattr(t, "num_experts", None):
            out["experts"] = t.num_experts
        vc = getattr(tc, "vision_config", None)
        if vc is not None and getattr(vc, "num_heads", None):
            out["vision_heads"] = vc.num_heads
        ac = getattr(tc, "audio_config", None)
        if ac is not None and getattr(ac, "encoder_attention_heads", None):
            out["audio_heads"] = ac.encoder_attention_heads
        return out

    # ------------------------------------------------------------------ forward
    def dummy_vision_inputs(self, model: nn.Module, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest valid vision input (one 1 x merge x merge patch grid), used to keep every rank's
        vision tower in the collective schedule when a micro-batch has no image/video."""
        vc = self.vision_tower(model).config
        merge = vc.spatial_merge_size
        in_ch = getattr(vc, "in_channels", getattr(vc, "in_chans", 3))
        dim = in_ch * vc.temporal_patch_size * vc.patch_size ** 2
        grid = torch.tensor([[1, merge, merge]], device=device)
        return torch.zeros(merge * merge, dim, device=device, dtype=dtype), grid

    def dummy_audio_inputs(self, model: nn.Module, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest audio input (one window of mel frames) for micro-batches without audio."""
        ac = self.audio_tower(model).config
        frames = 2 * ac.n_window
        return (torch.zeros(1, ac.num_mel_bins, frames, device=device, dtype=dtype),
                torch.ones(1, frames, device=device, dtype=torch.long))

    @staticmethod
    def _output_sum(out) -> torch.Tensor:
        """Sum of every feature tensor a vision/audio tower returned (pooled + DeepStack levels)."""
        total = out.pooler_output.sum() if getattr(out, "pooler_output", None) is not None \
            else out.last_hidden_state.sum()
        for f in getattr(out, "deepstack_features", None) or ():
            total = total + f.sum()
        return total

    def encode_vision(self, model: nn.Module, batch: dict) -> tuple[dict | None, torch.Tensor | None]:
        """Run the vision tower exactly once on all images and videos of the micro-batch (or on a
        dummy). Returns (``mm_encoder_outputs`` for the HF model or None, aux term or None)."""
        visual = self.vision_tower(model)
        pv, pvv = batch.get("pixel_values"), batch.get("pixel_values_videos")
        igrid, vgrid = batch.get("image_grid_thw"), batch.get("video_grid_thw")
        vdtype = next(visual.parameters()).dtype
        parts, grids = [], []
        if pv is not None:
            parts.append(pv); grids.append(igrid)
        if pvv is not None:
            parts.append(pvv); grids.append(vgrid)
        if not parts:
            dpix, dgrid = self.dummy_vision_inputs(model, batch["input_ids"].device, vdtype)
            return None, self._output_sum(visual(dpix, grid_thw=dgrid)) * 0.0
        out = visual(torch.cat(parts).to(vdtype), grid_thw=torch.cat(grids))
        merge2 = visual.spatial_merge_size ** 2
        n_img = int(igrid.prod(-1).sum()) // merge2 if pv is not None else 0
        deep = getattr(out, "deepstack_features", None)
        mm = {}
        for key, grid, lo, hi in (("image", igrid if pv is not None else None, 0, n_img),
                                  ("video", vgrid if pvv is not None else None, n_img, None)):
            if grid is None:
                continue
            sizes = (grid.prod(-1) // merge2).tolist()
            fields = {"pooler_output": torch.split(out.pooler_output[lo:hi], sizes)}
            if deep is not None:
                fields["deepstack_features"] = [torch.split(f[lo:hi], sizes) for f in deep]
            mm[key] = type(out)(**fields)
        return mm, None

    def encode_audio(self, model: nn.Module, batch: dict) -> tuple[dict, torch.Tensor | None]:
        """Audio families: the HF model runs its audio tower once on ``input_features`` (all audios
        of the micro-batch); without audio we run it on a dummy here. Returns (HF kwargs, aux)."""
        tower = self.audio_tower(model)
        if tower is None:
            return {}, None
        feats = batch.get("input_features")
        if feats is not None:
            return {"input_features": feats.to(next(tower.parameters()).dtype),
                    "feature_attention_mask": batch.get("feature_attention_mask")}, None
        dfeat, dmask = self.dummy_audio_inputs(model, batch["input_ids"].device, next(tower.parameters()).dtype)
        out = model.model.get_audio_features(dfeat, dmask, return_dict=True)
        return {}, self._output_sum(out) * 0.0

    def rope_index(self, model: nn.Module, sub: dict) -> torch.Tensor:
        """3-D mRoPE position ids [3, n, L] of n right-padded samples (``sub``: input_ids,
        attention_mask, mm_token_type_ids and the media grids of those samples in order), from the
        HF model's own ``get_rope_index``; used for packed rows (ops/packing.py)."""
        pos, _ = model.model.get_rope_index(sub["input_ids"], sub["mm_token_type_ids"],
                                            image_grid_thw=sub.get("image_grid_thw"),
                                            video_grid_thw=sub.get("video_grid_thw"),
                                            attention_mask=sub["attention_mask"],
                                            **{k: sub.get(k) for k in self.rope_index_keys})
        return pos

    #: further batch keys the family's ``get_rope_index`` takes (Qwen2.5-VL: second_per_grid_ts)
    rope_index_keys: tuple[str, ...] = ()

    #: batch keys passed through to the HF model's forward as they are (besides ids/mask/grids)
    forward_batch_keys: tuple[str, ...] = ("mm_token_type_ids",)

    def forward_hidden(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone on a collated batch; return (last hidden states [B,S,H], aux) where aux
        is a scalar to add to the loss (0 x dummy encoder outputs when the batch lacks a modality).

        Every encoder (vision, audio) is called exactly once per micro-batch on every rank (all
        items of that modality together, or a dummy), so FSDP collectives line up across ranks
        whatever the data.
        """
        mm, aux_v = self.encode_vision(model, batch)
        audio_kwargs, aux_a = self.encode_audio(model, batch)
        extra = {k: batch[k] for k in self.forward_batch_keys if batch.get(k) is not None}
        igrid = batch.get("image_grid_thw") if batch.get("pixel_values") is not None else None
        vgrid = batch.get("video_grid_thw") if batch.get("pixel_values_videos") is not None else None
        if batch.get("pair_media_shared"):   # preference pairs: media of the B prompts, rows 2B
            mm, igrid, vgrid = _twice(mm), _twice(igrid), _twice(vgrid)
            audio_kwargs = {k: _twice(v) for k, v in audio_kwargs.items()}
            extra = {k: (v if k in ("mm_token_type_ids", "use_audio_in_video") else _twice(v))
                     for k, v in extra.items()}
        attention_mask = batch.get("attention_mask")
        if batch.get("segment_ids") is not None:   # packed rows: per-sample positions, block-diagonal attention
            from omnitune.ops.packing import packed_position_ids
            extra["position_ids"] = packed_position_ids(self, model, batch, getattr(model.config, "pad_token_id", 0) or 0)
            attention_mask = None
        outputs = model.model(
            input_ids=batch["input_ids"],
            attention_mask=attention_mask,
            image_grid_thw=igrid,
            video_grid_thw=vgrid,
            mm_encoder_outputs=mm,
            use_cache=False,
            **audio_kwargs,
            **extra,
        )
        hidden = outputs.last_hidden_state
        aux = hidden.new_zeros(())
        for a in (aux_v, aux_a):
            if a is not None:
                aux = aux + a
        return hidden, aux


def omni_rope_index(model: nn.Module, sub: dict) -> torch.Tensor:
    """:meth:`ModelFamily.rope_index` of the Omni thinkers: audio lengths from
    feature_attention_mask, audio-in-video interleave and seconds per video grid as the HF forward
    passes them."""
    fam = sub.get("feature_attention_mask")
    pos, _ = model.model.get_rope_index(
        sub["input_ids"], sub.get("image_grid_thw"), sub.get("video_grid_thw"), sub["attention_mask"],
        bool(sub.get("use_audio_in_video", False)), None if fam is None else fam.sum(1),
        sub.get("video_second_per_grid"))
    return pos


def _twice(x):
    """Preference pairs with shared media (data/collator.py): the per-media values of the B prompts
    for the 2B rows (chosen rows, then rejected rows in the same order). Encoder outputs (a dict of
    per-image tuples, DeepStack lists of tuples) repeat their tuples; tensors and lists are
    concatenated with themselves."""
    if x is None:
        return None
    if hasattr(x, "pooler_output"):   # a ModelOutput (a dict too) of the vision tower
        return type(x)(**{k: _twice(v) for k, v in x.items()})
    if isinstance(x, dict):
        return {k: _twice(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return x + x
    if isinstance(x, list):
        return [_twice(v) for v in x] if x and isinstance(x[0], tuple) else x + x
    if torch.is_tensor(x):
        return torch.cat([x, x])
    raise TypeError(f"cannot repeat {type(x).__name__} for preference pairs")


def text_sizes(t, prefix: str = "text_decoder") -> dict[str, int]:
    """config.json text sizes under model.json's text_decoder keys (shared by the Qwen families)."""
    out = {
        f"{prefix}.num_layers": t.num_hidden_layers,
        f"{prefix}.hidden_size": t.hidden_size,
        f"{prefix}.ffn_hidden_size": t.intermediate_size,
        f"{prefix}.num_attention_heads": t.num_attention_heads,
        f"{prefix}.num_query_groups": t.num_key_value_heads,
        f"{prefix}.vocab_size": t.vocab_size,
    }
    if getattr(t, "head_dim", None):
        out[f"{prefix}.kv_channels"] = t.head_dim
    for k in ("num_experts", "moe_intermediate_size", "num_experts_per_tok"):
        if getattr(t, k, None):
            out[f"{prefix}.{k}"] = getattr(t, k)
    return out


# ---------------------------------------------------------------------------------------------------
# Per-module layers for model.json settings (recompute, activation offload, attention, fused MoE).
# Defaults derived from module_groups(), so a family gets them without code; override when a
# family's layers are not transformers GradientCheckpointingLayer modules.

def _held(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, or None where a pipeline stage does not hold it (parallel/pp.py)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _module_roots(self, model: nn.Module) -> dict[str, list[nn.Module]]:
    """model.json module path -> the top modules of its group (the group's paths; on a pipeline
    stage, those it holds)."""
    out = {g.name: [m for m in (_held(model, p) for p in g.paths) if m is not None] for g in self.module_groups()}
    return {k: v for k, v in out.items() if v}


def _module_layers(self, model: nn.Module) -> dict[str, list[nn.Module]]:
    """model.json module path -> its repeated layers in forward order: the outermost transformers
    ``GradientCheckpointingLayer`` modules under the group's paths (excluded paths left out). A
    group without such layers (e.g. a projector) has its path modules as units (a ModuleList path,
    such as Qwen3-VL's deepstack mergers, contributes its members)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    out: dict[str, list[nn.Module]] = {}
    for g in self.module_groups():
        excluded = {id(m) for m in (_held(model, e) for e in g.exclude) if m is not None}
        layers: list[nn.Module] = []

        def walk(m: nn.Module) -> None:
            if id(m) in excluded:
                return
            if isinstance(m, GradientCheckpointingLayer):
                layers.append(m)
                return
            for child in m.children():
                walk(child)

        held = [m for m in (_held(model, p) for p in g.paths) if m is not None]
        for m in held:
            walk(m)
        if not layers:  # e.g. a projector: its modules (the members of a ModuleList) are the units
            for m in held:
                layers.extend(m.children() if isinstance(m, (nn.ModuleList, nn.ModuleDict)) else [m])
        if held:
            out[g.name] = layers
    return out


ModelFamily.module_roots = _module_roots
ModelFamily.module_layers = _module_layers
