"""DPO: preference training on pairs (data.json ``attr.ranking: true``), in the one training loop.

Each dataset item is a pair: a prompt with its media and two answers. The collator makes 2B rows
(B chosen, then the B rejected in the same order) and keeps each prompt's images / videos once;
the family's forward encodes them once and uses the features for both rows. A pair is never split
over micro-batches or ranks.

Per pair, with log-probabilities summed over the answer tokens (``loss.row_log_probs``) of the
policy (pi) and of the reference (ref), chosen (c) and rejected (r)::

    d        = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid  = -logsigmoid(beta d) (1 - eps) - logsigmoid(-beta d) eps     (eps: --dpo-label-smoothing)
    ipo      = (d' - 1 / (2 beta))^2     d' as d with each log-prob divided by its answer's tokens
    hinge    = relu(1 - beta d)
    loss     = that + pref_ftx x (-pi_c / chosen tokens)                   (--pref-ftx: SFT on chosen)

The step's loss is the mean over the pairs of the global batch (every micro-batch of every
data-parallel rank), so it is the same for any grad-acc x DP split. Logged per step:
rewards/chosen = beta (pi_c - ref_c), rewards/rejected = beta (pi_r - ref_r), their margin and the
share of pairs with chosen > rejected (rewards/accuracy), means over the global batch.

The reference, never trained, is one of (:func:`resolve_reference`):
- under LoRA, the policy itself with its adapters switched off (``lora.adapters_disabled``: no
  second copy of the model) when ``--ref-model`` is not given or names the LoRA base;
- else a frozen copy, sharded like the policy (same TP / EP plans and FSDP2 mesh), of
  ``--ref-model`` or of the starting weights (``--load``); a resumed run reads the reference its
  first run used (recorded in trainer_state.json).

Context parallelism is refused with DPO in this version (the per-row sums would have to be
reduced over the CP ranks inside the graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from omnitune.config.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
ADAPTERS_OFF = "adapters_off"   # reference kind: the LoRA policy with its adapters switched off


@dataclass(frozen=True)
class DpoSpec:
    beta: float
    loss_type: str
    label_smoothing: float
    pref_ftx: float
    ref: tuple[str, str | None]   # ("hf" | "mm", path) or (ADAPTERS_OFF, None)

    def describe(self) -> str:
        kind, path = self.ref
        ref = ("the policy with its LoRA adapters off (no second copy)" if kind == ADAPTERS_OFF
               else f"frozen copy of {kind} {path}")
        return (f"dpo        : {self.loss_type}, beta {self.beta}, label smoothing {self.label_smoothing}, "
                f"pref-ftx {self.pref_ftx}; reference: {ref}")

    def to_json(self) -> dict:
        return {"beta": self.beta, "loss_type": self.loss_type, "label_smoothing": self.label_smoothing,
                "pref_ftx": self.pref_ftx, "ref_kind": self.ref[0], "ref_path": self.ref[1]}


def _weights_kind(path: str, flag: str) -> str:
    """"hf" or "mm" for a folder of weights a reference can be read from; else a ConfigError."""
    from omnitune.checkpoint.mm_load import is_dcp_release, is_mm_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{flag} {path}: no such folder")
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return "hf"
    if is_mm_checkpoint(p) or is_dcp_release(p):
        return "mm"
    raise ConfigError(f"{flag} {path}: not an HF folder (config.json + *.safetensors) nor an mm-convert "
                      f"output; give the reference model's weights")


def resolve_reference(args, load_kind: str, load_path: str | None, lora_base, resume_state: dict | None):
    """Where the reference's weights come from (see the module doc)."""
    if args.ref_model:
        kind = _weights_kind(args.ref_model, "--ref-model")
        if lora_base is not None and Path(args.ref_model).resolve() == Path(lora_base[1]).resolve():
            return (ADAPTERS_OFF, None)
        return (kind, str(args.ref_model))
    if lora_base is not None:
        return (ADAPTERS_OFF, None)
    if load_kind in ("hf", "mm"):
        return (load_kind, load_path)
    if load_kind == "resume":
        saved = (resume_state or {}).get("dpo")
        if saved and saved.get("ref_kind") in ("hf", "mm"):
            _weights_kind(saved["ref_path"], f"--load {load_path}: the DPO reference it records,")
            return (saved["ref_kind"], saved["ref_path"])
        raise ConfigError(f"--load {load_path}: this checkpoint records no DPO reference model; give "
                          f"--ref-model DIR (the weights the DPO run started from)")
    raise ConfigError("DPO needs a reference model: give --load DIR (the reference is then a frozen copy of the "
                      "starting weights) or --ref-model DIR")


def spec_from(args, data_cfg, data_path: str, *, load_kind: str, load_path: str | None, lora_base,
              resume_state: dict | None) -> DpoSpec | None:
    """The DPO settings of a run, or None (SFT). Preference data means DPO; a DPO flag on data
    without ``attr.ranking`` is an error naming the flag."""
    from omnitune.config.errors import flag_of
    from omnitune.config.train import DPO_FIELDS

    ranking = data_cfg.dataset_param.attr.ranking
    given = [n for n in DPO_FIELDS if n in args.model_fields_set]
    if not ranking:
        if given:
            raise ConfigError(f"{flag_of(given[0])}: DPO needs preference pairs, but {data_path} has "
                              f"dataset_param.attr.ranking false; set attr.ranking true with attr.chosen / "
                              f"attr.rejected columns (omnitune data rlhfv-to-dpo writes such data), or remove "
                              f"{flag_of(given[0])}")
        return None
    if args.context_parallel_size > 1:
        raise ConfigError("--context-parallel-size: not supported with DPO (attr.ranking data) in this version; "
                          "remove it (use TP or data parallel)")
    ref = resolve_reference(args, load_kind, load_path, lora_base, resume_state)
    return DpoSpec(args.dpo_beta, args.dpo_loss_type, args.dpo_label_smoothing, args.pref_ftx, ref)


# ------------------------------------------------------------------------------------------ loss
def pair_losses(spec: DpoSpec, policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per-pair loss terms of one micro-batch: ``policy`` / ``reference`` [2B] summed answer
    log-probs (rows: B chosen, then B rejected), ``tokens`` [2B] answer tokens per row.

    Returns {"loss": [B] (with grad), "chosen_rewards", "rejected_rewards": [B] (detached)}."""
    b = policy.shape[0] // 2
    pol, ref = policy.float(), reference.float().detach()
    n = tokens.to(pol.dtype).clamp(min=1)
    pc, pr, rc, rr = pol[:b], pol[b:], ref[:b], ref[b:]
    if spec.loss_type == "ipo":   # length-normalised log-probs
        d = (pc / n[:b] - rc / n[:b]) - (pr / n[b:] - rr / n[b:])
        loss = (d - 1.0 / (2.0 * spec.beta)) ** 2
    else:
        d = (pc - rc) - (pr - rr)
        if spec.loss_type == "sigmoid":
            eps = spec.label_smoothing
            loss = -F.logsigmoid(spec.beta * d) * (1.0 - eps) - F.logsigmoid(-spec.beta * d) * eps
        elif spec.loss_type == "hinge":
            loss = torch.relu(1.0 - spec.beta * d)
        else:
            raise ValueError(f"unknown DPO loss type {spec.loss_type!r}; one of {LOSS_TYPES}")
    if spec.pref_ftx:
        loss = loss + spec.pref_ftx * (-pc / n[:b])
    return {"loss": loss, "chosen_rewards": (spec.beta * (pc - rc)).detach(),
            "rejected_rewards": (spec.beta * (pr - rr)).detach()}


# ------------------------------------------------------------------------------------- reference
def build_reference(plan, dims, device, policy):
    """The reference forward: a callable ``batch -> (row log-probs, row tokens)`` under no_grad."""
    from omnitune.train.lora import adapters_disabled

    kind, path = plan.dpo.ref
    if kind == ADAPTERS_OFF:
        def forward(batch):
            with torch.no_grad(), adapters_disabled(policy.hf):
                logp, n, _ = policy(batch, per_row=True)
            return logp, n
        return forward, None

    from omnitune.checkpoint.mm_load import load_mm_weights
    from omnitune.parallel.parallelize import parallelize
    from omnitune.train.model import TrainModel, build_meta_model, load_hf_model

    meta = plan.args.init_model_with_meta_device
    if meta:
        hf = build_meta_model(plan.family, plan.hf_config)
    else:
        hf = load_hf_model(plan.family, path if kind == "hf" else None, plan.hf_config, init_weights=kind == "hf")
        if kind == "mm":
            load_mm_weights(path, plan.family, hf)
    hf.requires_grad_(False)
    if not meta:
        hf.to(device)
    ref = TrainModel(hf, plan.family, plan.model_cfg)
    parallelize(ref, plan.family, dims, plan.args.bf16)
    if meta:
        from omnitune.checkpoint.sharded_load import materialize_and_load
        materialize_and_load(ref, plan.family, kind, path, device=device)
    ref.eval()

    def forward(batch):
        with torch.no_grad():
            logp, n, _ = ref(batch, per_row=True)
        return logp, n
    return forward, ref
