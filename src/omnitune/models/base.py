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


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


class ModelFamily:
    #: model.json ``model_id`` values this family answers to
    model_ids: tuple[str, ...] = ()
    #: registry name (folder name)
    name: str = ""
    #: default data template
    template: str = ""
    #: transformers class name of the trainable model
    hf_class_name: str = ""
    #: transformers config class name
    hf_config_class_name: str = ""
    #: Omni: transformers class of the FULL model (thinker + talker + vocoder) that HF folders hold;
    #: "" when the folder holds the trainable model itself
    hf_full_class_name: str = ""
    hf_full_config_class_name: str = ""
    #: Omni: key prefix of the trainable part inside the full folder ("thinker."), else ""
    folder_prefix: str = ""

    # ------------------------------------------------------------------ classes and configs
    def model_class(self):
        import transformers
        return getattr(transformers, self.hf_class_name)

    def config_class(self):
        import transformers
        return getattr(transformers, self.hf_config_class_name)

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

    def audio_tower(self, model: nn.Module) -> nn.Module | None:
        """The audio encoder (Omni), None for families without audio."""
        return None

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def text_config(self, config):
        return getattr(config, "text_config", config)

    def structure_sizes(self, config) -> dict[str, int]:
        """model.json key path -> size from config.json, for the consistency check."""
        return {}

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

    def forward_hidden(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone on a collated batch; return (last hidden states [B,S,H], aux) where aux
        is a scalar to add to the loss (0 x dummy vision output when the batch has no media).

        The vision tower is called exactly once per micro-batch on every rank (images and videos
        concatenated, or a dummy), so FSDP collectives line up across ranks whatever the data.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inner = model.model
        visual = self.vision_tower(model)
        pv, pvv = batch.get("pixel_values"), batch.get("pixel_values_videos")
        igrid, vgrid = batch.get("image_grid_thw"), batch.get("video_grid_thw")
        aux = None
        mm = {}
        parts, grids = [], []
        if pv is not None:
            parts.append(pv); grids.append(igrid)
        if pvv is not None:
            parts.append(pvv); grids.append(vgrid)
        vdtype = next(visual.parameters()).dtype
        if parts:
            out = visual(torch.cat(parts).to(vdtype), grid_thw=torch.cat(grids))
            feats = out.pooler_output
            merge2 = visual.spatial_merge_size ** 2
            n_img = int(igrid.prod(-1).sum()) // merge2 if pv is not None else 0
            if pv is not None:
                sizes = (igrid.prod(-1) // merge2).tolist()
                mm["image"] = BaseModelOutputWithPooling(pooler_output=torch.split(feats[:n_img], sizes))
            if pvv is not None:
                sizes = (vgrid.prod(-1) // merge2).tolist()
                mm["video"] = BaseModelOutputWithPooling(pooler_output=torch.split(feats[n_img:], sizes))
        else:
            dpix, dgrid = self.dummy_vision_inputs(model, batch["input_ids"].device, vdtype)
            out = visual(dpix, grid_thw=dgrid)
            aux = out.pooler_output.sum() * 0.0
        outputs = inner(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            image_grid_thw=igrid if pv is not None else None,
            video_grid_thw=vgrid if pvv is not None else None,
            mm_token_type_ids=batch.get("mm_token_type_ids"),
            mm_encoder_outputs=mm or None,
            use_cache=False,
        )
        hidden = outputs.last_hidden_state
        if aux is None:
            aux = hidden.new_zeros(())
        return hidden, aux


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
