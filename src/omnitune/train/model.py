"""Build the trainable model: HF class from config.json, weights, freeze groups, FSDP2.

:class:`TrainModel` wraps the HF model so one ``forward`` runs backbone + vision + loss: FSDP2's
root hooks sit on this forward, so the root-level parameters (embeddings, lm_head, patch embed,
merger) are gathered for everything the step does.
"""
from __future__ import annotations

import torch
from torch import nn

from omnitune.config.errors import ConfigError
from omnitune.models.base import ModelFamily
from omnitune.train.loss import row_log_probs, token_losses


class TrainModel(nn.Module):
    """``model_cfg`` (the parsed model.json) brings the per-module settings (attention
    implementation, fused MoE, recompute, activation offload) and loss_cfg; they are applied here,
    before FSDP2 wraps the model."""

    #: a pipeline stage's part of the model (parallel/pp.py): settings of modules it lacks are skipped
    partial_model = False

    def __init__(self, hf_model: nn.Module, family: ModelFamily, model_cfg=None):
        super().__init__()
        self.hf = hf_model
        self.family = family
        loss_cfg = getattr(model_cfg, "loss_cfg", None)
        self.compute_mode = loss_cfg.compute_mode if loss_cfg else "default"
        self.chunk_size = loss_cfg.chunk_size if loss_cfg else None
        self.router_aux_coef = float(loss_cfg.router_aux_loss_coef) if loss_cfg else 0.0
        self.settings_report: dict = {}
        self.offload_stats: dict = {}
        if model_cfg is not None:
            self.settings_report = apply_module_settings(hf_model, family, model_cfg, self.offload_stats,
                                                         partial=self.partial_model)
        self.cp = None   # parallel.cp.ContextParallel once apply_cp ran
        self._router = None
        if self.router_aux_coef:
            from omnitune.ops.moe import RouterAuxLoss
            roots = [m for ms in family.module_roots(hf_model).values() for m in ms]
            try:
                self._router = RouterAuxLoss(hf_model, roots)
            except ValueError as e:
                raise ConfigError(f"model.json loss_cfg.router_aux_loss_coef: {e}; remove it") from None

    def forward(self, batch: dict, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (sum of token losses, trained-token count, aux term to add to the loss); with
        ``per_row`` (DPO): (log-probability of each row's trained tokens [B], trained tokens per row
        [B], aux term) instead of the first two. Both go through this ``forward`` so FSDP2's root
        hooks gather the root parameters either way.

        With ``batch["loss_weights"]`` ([B, S], see train.loss.token_weights) the first item is the
        weighted sum. The aux term holds ``router_aux_loss_coef x`` the router load-balancing loss of
        this micro-batch when that coefficient is set.

        Under context parallelism (``self.cp``, parallel/cp.py) all three cover this rank's sequence
        chunk only: loss sum and count summed over the cp ranks give the micro-batch's; the aux term
        is the load-balancing loss of the local tokens (its mean over cp ranks stands for the
        micro-batch's)."""
        router = self._router if torch.is_grad_enabled() else None  # evaluation: no aux term wanted
        if router is not None:
            router.start()
        hidden, aux = self.family.forward_hidden(self.hf, batch)
        labels, weights, mask = batch["labels"], batch.get("loss_weights"), batch.get("attention_mask")
        if self.cp is not None:   # hidden is this rank's chunk: targets shifted on the full sequence
            labels, weights = self.cp.shifted_local(labels, weights)
            mask = None if mask is None else self.cp.local(mask, 1, 0)
            assert hidden.shape[1] == labels.shape[1], (hidden.shape, labels.shape)
        if per_row:
            if self.cp is not None:
                raise NotImplementedError("per-row log-probs under context parallelism")
            loss_sum, n = row_log_probs(hidden, self.family.lm_head(self.hf), labels, self.compute_mode,
                                        self.chunk_size)
        else:
            loss_sum, n = token_losses(hidden, self.family.lm_head(self.hf), labels, weights, self.compute_mode,
                                       self.chunk_size, pre_shifted=self.cp is not None)
        if router is not None:    # under cp: the load-balancing loss of this rank's tokens
            aux = aux + self.router_aux_coef * router.loss(mask).to(aux.dtype)
        return loss_sum, n, aux


    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        """No-op when the model is not FSDP2-wrapped (one process, parallel/parallelize.py): there is
        no gradient reduction to defer. FSDP2's own method takes precedence once wrapped."""


def apply_module_settings(hf_model: nn.Module, family: ModelFamily, model_cfg, offload_stats=None,
                          partial: bool = False) -> dict:
    """Apply model.json per-module settings to the HF model (before FSDP2). Returns what was done
    per module, e.g. {"text_decoder": {"recompute": 2, "offload": 0, "experts": 2}}."""
    from omnitune.ops.attention import set_attn_implementation
    from omnitune.ops.moe import experts_modules, set_experts_implementation
    from omnitune.ops.recompute import apply_recompute_and_offload

    settings = model_cfg.modules()
    roots = family.module_roots(hf_model)
    report: dict[str, dict] = {}
    for name, mod in settings.items():
        if name not in roots:
            if partial:   # held by another pipeline stage
                continue
            if any(getattr(mod, k) for k in ("attn_implementation", "recompute_granularity", "activation_offload",
                                             "use_npu_fused_moe")):
                raise ConfigError(f"model.json {name}: this model ({family.name}) has no such module")
            continue
        if mod.attn_implementation:
            if not set_attn_implementation(roots[name], mod.attn_implementation):
                raise ConfigError(f"model.json {name}.attn_implementation: {name} has no attention layers; "
                                  f"remove the key")
            report.setdefault(name, {})["attn"] = mod.attn_implementation
    # experts: fused where the module asks for it, transformers' eager loop everywhere else (its
    # default, grouped_mm, fails on some operand layouts; see ops/moe.py)
    fused_ids = set()
    for name, mod in settings.items():
        if name in roots and mod.use_npu_fused_moe:
            ex = [e for r in roots[name] for e in experts_modules(r)]
            if not ex:
                raise ConfigError(f"model.json {name}.use_npu_fused_moe: {name} of {family.name} has no MoE "
                                  f"experts; remove the key")
            set_experts_implementation(ex, fused=True)
            fused_ids |= {id(e) for e in ex}
            report.setdefault(name, {})["experts"] = len(ex)
    set_experts_implementation([e for e in experts_modules(hf_model) if id(e) not in fused_ids], fused=False)
    layers = family.module_layers(hf_model)
    for name, r in apply_recompute_and_offload(layers, {k: v for k, v in settings.items() if k in roots},
                                               offload_stats).items():
        report.setdefault(name, {}).update(r)
    return report


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


def build_meta_model(family: ModelFamily, hf_config) -> nn.Module:
    """``--init-model-with-meta-device``: the fp32 trainable model (Omni: the thinker, from a full
    folder's config too) with every parameter and buffer on the meta device (no memory). Shard it
    (TP/EP plans, FSDP2), then ``checkpoint.sharded_load.materialize_and_load`` gives each rank its
    own shards."""
    with torch.device("meta"):
        model = family.model_class()._from_config(family.trainable_config(hf_config), dtype=torch.float32)
    model.config.use_cache = False
    for p in family.unused_parameters(model):   # as load_hf_model: never gets a grad
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
