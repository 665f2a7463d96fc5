"""Qwen3-Omni (MoE): HF weight names <-> MindSpeed-MM's ExpertMerge DCP checkpoint / merged HF folder.

The HF folder is the full model with one weight per expert
(``thinker.model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``, nn.Linear layout). The
ExpertMerge form stacks them per layer: ``mlp.experts.gate_up_proj`` = stack_e(cat([gate_e, up_e]).T)
[E, H, 2I] and ``mlp.experts.down_proj`` = stack_e(down_e.T) [E, I, H] (kept 3-D for Qwen3-Omni), and
drops the ``thinker.`` prefix. Weights of the talker / code2wav keep their names.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

MODEL_TYPES = ("qwen3_omni_moe",)
FOLDER_PREFIX = "thinker."
EXPERT = re.compile(r"thinker\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
MERGED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
OTHER_PARTS = ("talker.", "code2wav.")


def expert_config(config: dict) -> tuple[int, int]:
    """(num_hidden_layers, num_experts) of the thinker's MoE LLM."""
    text = (config.get("thinker_config") or config).get("text_config") or {}
    experts = text.get("num_experts") or text.get("num_local_experts")  # transformers 4.x / 5 spelling
    if experts is None or "num_hidden_layers" not in text:
        raise ValueError("config.json: thinker_config.text_config needs num_hidden_layers and num_experts")
    return int(text["num_hidden_layers"]), int(experts)


def merge(sd: dict, num_experts: int) -> dict:
    """One layer's HF tensors (full-folder names) -> merged names (no ``thinker.``)."""
    out, experts = {}, {}
    for k, v in sd.items():
        if m := EXPERT.fullmatch(k):
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = v
        else:
            out[k[len(FOLDER_PREFIX):] if k.startswith(FOLDER_PREFIX) else k] = v
    for layer, parts in experts.items():
        missing = [f"experts.{e}.{n}_proj" for e in range(num_experts) for n in ("gate", "up", "down")
                   if (e, n) not in parts]
        if missing or len(parts) != 3 * num_experts:
            raise ValueError(f"thinker layer {layer}: expert weights missing or unexpected (e.g. {missing[:3]}); "
                             f"config.json says num_experts={num_experts}")
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]]).T for e in range(num_experts)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [parts[(e, "down")].T for e in range(num_experts)])
    return out


def split(sd: dict) -> dict:
    """Inverse of merge: merged names -> full-folder names, experts unstacked (contiguous)."""
    out = {}
    for k, v in sd.items():
        if m := MERGED.fullmatch(k):
            layer, what = m[1], m[2]
            for e, w in enumerate(v.unbind(0)):
                p = f"thinker.model.layers.{layer}.mlp.experts.{e}."
                if what == "gate_up_proj":
                    gate, up = torch.chunk(w.T, 2, dim=0)
                    out[p + "gate_proj.weight"] = gate.contiguous()
                    out[p + "up_proj.weight"] = up.contiguous()
                else:
                    out[p + "down_proj.weight"] = w.T.contiguous()
        elif k.startswith(OTHER_PARTS):
            out[k] = v
        else:
            out[FOLDER_PREFIX + k] = v
    return out


def is_merged_layer_key(k: str) -> Optional[str]:
    m = MERGED.fullmatch(k)
    return m[1] if m else None


_MODULE = [("model.", "model.language_model."), ("visual.", "model.visual."), ("audio_tower.", "model.audio_tower.")]


def dcp_to_model(name: str, t: torch.Tensor, experts: Optional[int] = None,
                 model_shapes: Optional[dict] = None) -> Optional[tuple[str, torch.Tensor]]:
    """An ExpertMerge DCP entry -> (thinker module name, tensor) for ``--load``; talker / code2wav
    entries -> None. Merged experts [E, H, 2I] / [E, I, H] (built by ``merge``, so the layout is
    known) are [E, 2I, H] / [E, H, I] in the transformers 5 thinker."""
    if name.startswith(OTHER_PARTS):
        return None
    if MERGED.fullmatch(name):
        t = t.transpose(1, 2)
    for a, b in _MODULE:
        if name.startswith(a):
            return b + name[len(a):], t
    return name, t
