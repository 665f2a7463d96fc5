"""What differs per family between transformers 4.57.6 (the MindSpore back-end) and the
transformers 5 classes the PyTorch path trains: module names and the forward call.

Everything else (data, templates, loss, model.json groups) is the shared omnitune code.
``NAMES`` maps this back-end's parameter names onto the PyTorch path's (prefix pairs, first match
wins), so checkpoints and freeze groups use one set of names.
"""
from __future__ import annotations

import os
import re
ATTN = os.environ.get("MS_ATTN", "sdpa")
from dataclasses import dataclass


@dataclass(frozen=True)
class Adapter:
    family: str                      # omnitune registry name
    hf_class: str                    # transformers 4.57 class of the trainable model
    names: tuple[tuple[str, str], ...]   # (this back-end's prefix, the PyTorch path's prefix)
    unused: tuple[str, ...] = ()     # parameters the forward never uses (frozen; as the PyTorch path)
    folder_prefix: str = ""          # key prefix of the trainable part in a full folder (Omni: thinker.)

    def to_omnitune(self, name: str) -> str:
        for here, there in self.names:
            if name.startswith(here):
                return there + name[len(here):]
        return name

    def from_omnitune(self, name: str) -> str:
        for here, there in self.names:
            if name.startswith(there):
                return here + name[len(there):]
        return name

    def forward_hidden(self, model, batch: dict):
        """Last hidden states [B, S, H] (after the final norm) of a collated micro-batch."""
        if self.family == "qwen2_vl":
            out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                              use_cache=False)
            return out.last_hidden_state
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                    input_features=batch.get("input_features"),
                    feature_attention_mask=batch.get("feature_attention_mask"),
                    use_audio_in_video=bool(batch.get("use_audio_in_video", False)),
                    video_second_per_grid=batch.get("video_second_per_grid"),
                    use_cache=False, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1]


ADAPTERS = {
    "qwen2_vl": Adapter("qwen2_vl", "Qwen2VLForConditionalGeneration", names=()),
    # 4.57's thinker holds visual / audio_tower / model (text) at its top; transformers 5 nests them in .model
    "qwen2_5_omni": Adapter("qwen2_5_omni", "Qwen2_5OmniThinkerForConditionalGeneration",
                            names=(("visual.", "model.visual."), ("audio_tower.", "model.audio_tower."),
                                   ("model.", "model.language_model.")),
                            unused=("audio_tower.audio_bos_eos_token.weight",), folder_prefix="thinker."),
}


def adapter_for(family_name: str) -> Adapter:
    try:
        return ADAPTERS[family_name]
    except KeyError:
        raise ValueError(f"the MindSpore back-end trains {' and '.join(sorted(ADAPTERS))}, not {family_name}; "
                         f"use the PyTorch back-end (no --backend) for it") from None


def load_model(adapter: Adapter, folder, config):
    """fp32 trainable model from an HF folder (a transformers 4.57 view of it: folders.hf4_view)."""
    import torch
    import transformers

    cls = getattr(transformers, adapter.hf_class)
    if adapter.folder_prefix:
        sub = config.thinker_config
        model = cls.from_pretrained(folder, config=sub, dtype=torch.float32, attn_implementation=ATTN,
                                    key_mapping={"^" + re.escape(adapter.folder_prefix): ""})
    else:
        model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation=ATTN)
    model.config.use_cache = False
    names = dict(model.named_parameters())
    for n in adapter.unused:
        names[n].requires_grad_(False)
    return model
