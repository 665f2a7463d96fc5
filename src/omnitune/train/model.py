"""Build the trainable model: HF class from config.json, weights, freeze groups, FSDP2.

:class:`TrainModel` wraps the HF model so one ``forward`` runs backbone + vision + loss: FSDP2's
root hooks sit on this forward, so the root-level parameters (embeddings, lm_head, patch embed,
merger) are gathered for everything the step does.
"""
from __future__ import annotations

import torch
from torch import nn

from omnitune.models.base import ModelFamily
from omnitune.train.loss import token_losses


class TrainModel(nn.Module):
    def __init__(self, hf_model: nn.Module, family: ModelFamily):
        super().__init__()
        self.hf = hf_model
        self.family = family

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (sum of token losses, trained-token count, aux term to add to the loss)."""
        hidden, aux = self.family.forward_hidden(self.hf, batch)
        loss_sum, n = token_losses(hidden, self.family.lm_head(self.hf), batch["labels"])
        return loss_sum, n, aux


def load_hf_model(family: ModelFamily, hf_dir: str | None, config=None, init_weights: bool = True) -> nn.Module:
    """fp32 model: weights from ``hf_dir`` when init_weights, else random init from ``config``
    (the weights then come from a checkpoint)."""
    if init_weights:
        model = family.load_pretrained(hf_dir, dtype=torch.float32)
    else:  # Omni: a full folder's config -> the thinker's
        model = family.model_class()._from_config(family.trainable_config(config), dtype=torch.float32)
    model.config.use_cache = False
    for p in family.unused_parameters(model):   # never gets a grad: keep it out of the optimizer
        p.requires_grad_(False)
    return model


def apply_freeze(model: nn.Module, family: ModelFamily, frozen: set[str]) -> dict[str, int]:
    """Set requires_grad from model.json freeze flags. Returns trainable parameter counts per group."""
    counts = {}
    for group in family.module_groups():
        excluded = set()
        for ex in group.exclude:
            excluded |= {id(p) for p in model.get_submodule(ex).parameters()}
        n = 0
        for path in group.paths:
            for p in model.get_submodule(path).parameters():
                if id(p) in excluded:
                    continue
                if group.name in frozen:
                    p.requires_grad_(False)
                n += p.numel() if p.requires_grad else 0
        counts[group.name] = n
    return counts
