"""LoRA through peft: which modules get adapters, injecting them, and what a checkpoint keeps.

The rule (README "LoRA"): with ``--lora-target-modules`` every base weight is frozen, everywhere.
Adapters go on the ``nn.Linear`` modules the target names select, but only on those inside a
model.json module that is NOT frozen (``freeze: true`` means: this module gets no adapter and
trains nothing). So the trainable parameters are exactly the adapters' ``lora_A`` / ``lora_B``
matrices of the unfrozen modules.

A target name is either one of the seed's Megatron names (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``), which the family's ``lora_target_map`` (models/<family>/spec.py)
turns into its HF module paths, or an HF module name matched at the end of a module path at a dot
boundary (``q_proj``, ``attn.qkv``, ``model.visual.blocks.0.attn.qkv``). A name that selects no
Linear module of the model is an error before launch, naming the flag.

peft's ``inject_adapter_in_model`` replaces the selected modules in place (the HF module tree and
its paths stay what the families, FSDP2 units and recompute expect), before FSDP2 wraps the model.
Its ``lora_A`` init draws from a generator seeded with ``--seed`` (in a forked RNG state), so every
rank starts from the same adapter and the global RNG stream is left as it was.

Training checkpoints hold the adapter tensors (``.lora_A.`` / ``.lora_B.`` keys) and their
optimizer state only; the base weights are read again from the base model on resume and export.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from omnitune.config.errors import ConfigError

FLAG = "--lora-target-modules"
MEGATRON_NAMES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ADAPTER_NAME = "default"   # peft's adapter name inside the modules (keys ``...lora_A.default.weight``)


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA flags of a run (targets as the user typed them)."""
    targets: tuple[str, ...]
    r: int
    alpha: int
    dropout: float

    @classmethod
    def from_args(cls, args) -> LoraSpec | None:
        if not args.lora_target_modules:
            return None
        return cls(tuple(args.lora_target_modules), args.lora_r, args.lora_alpha, args.lora_dropout)

    def to_json(self) -> dict:
        return {"targets": list(self.targets), "r": self.r, "alpha": self.alpha, "dropout": self.dropout}

    @classmethod
    def from_json(cls, d: dict) -> LoraSpec:
        return cls(tuple(d["targets"]), int(d["r"]), int(d["alpha"]), float(d["dropout"]))

    def flags(self) -> str:
        return (f"{FLAG} {' '.join(self.targets)} --lora-r {self.r} --lora-alpha {self.alpha} "
                f"--lora-dropout {self.dropout}")


def is_adapter_key(key: str) -> bool:
    """State-dict keys of adapter tensors (what a LoRA checkpoint saves)."""
    return ".lora_A." in key or ".lora_B." in key


def _owners(model: nn.Module, family) -> dict[str, str]:
    """Module path -> the model.json module (group) it belongs to (excluded sub-paths go to their own)."""
    owner: dict[str, str] = {}
    for g in family.module_groups():
        for path in g.paths:
            for name, _ in model.get_submodule(path).named_modules(prefix=path):
                if not any(name == e or name.startswith(e + ".") for e in g.exclude):
                    owner[name] = g.name
    return owner


def _matches(name: str, target: str, family) -> bool:
    pats = family.lora_target_map.get(target)
    if pats is not None:
        return any(re.search(r"(^|\.)(?:" + p + r")$", name) for p in pats)
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, family, targets, frozen: set[str]) -> list[str]:
    """Full paths of the Linear modules that get an adapter: selected by ``targets`` and inside a
    model.json module not in ``frozen`` (see the module docstring). Raises ConfigError naming the
    flag for a name that selects no Linear module, or when every selected module is frozen."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unused = {id(p) for p in family.unused_parameters(model)}
    chosen: set[str] = set()
    for t in targets:
        hits = [n for n in linear if _matches(n, t, family)]
        if not hits:
            known = ", ".join(family.lora_target_map)
            raise ConfigError(f"{FLAG} {t}: selects no Linear module of this {family.name} model; use one of "
                              f"{known} or an HF module name such as q_proj")
        chosen |= set(hits)
    owner = _owners(model, family)
    names = [n for n in linear if n in chosen and owner.get(n) not in frozen
             and id(model.get_submodule(n).weight) not in unused]
    if not names:
        groups = sorted({owner.get(n, "?") for n in chosen})
        raise ConfigError(f"{FLAG} {' '.join(targets)}: every module it selects is in a frozen model.json module "
                          f"({', '.join(groups)}): no adapter to train; set freeze: false on one of them")
    return names


def peft_config(spec: LoraSpec, names: list[str], base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(names),
                      bias="none", base_model_name_or_path=base)


def apply_lora(model: nn.Module, spec: LoraSpec, names: list[str], seed: int) -> int:
    """Freeze every base weight, put peft adapters on ``names`` (in place, before FSDP2) with a
    seeded init; returns the trainable (adapter) parameter count."""
    from peft import inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config(spec, names), model, adapter_name=ADAPTER_NAME)
    for n, p in model.named_parameters():   # peft marks the adapters trainable; make the rule explicit
        p.requires_grad_(is_adapter_key(n))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model's forward with the adapters switched off (no copy of the model): what a DPO
    reference under LoRA needs. Sets peft's per-layer ``disable_adapters`` flag directly, not
    ``enable_adapters(False)``, which would also flip the adapters' requires_grad."""
    layers = [m for _, m in lora_layers(model)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft's ``merge``) and put the plain base Linear back
    in its place: the model is then the HF class with updated weights, no peft module left."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    return model


def write_adapter_folder(model: nn.Module, spec: LoraSpec, names: list[str], base: str, out: Path,
                         prefix: str = "") -> None:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    ``PeftModel.from_pretrained(<HF class>.from_pretrained(base), out)`` loads. ``prefix``: where the
    trained model sits in the folder's model (Omni: "thinker."), put in front of every module path."""
    from safetensors.torch import save_file

    tag = f".{ADAPTER_NAME}."
    tensors = {"base_model.model." + prefix + k.replace(tag, "."): v.detach().contiguous().cpu()
               for k, v in model.state_dict().items() if is_adapter_key(k)}
    peft_config(spec, [prefix + n for n in names], base=str(base)).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def check_layout(args) -> None:
    """LoRA combinations this version refuses before launch (each names its flag)."""
    refused = [("--tensor-model-parallel-size", args.tensor_model_parallel_size > 1),
               ("--context-parallel-size", args.context_parallel_size > 1),
               ("--expert-model-parallel-size", args.expert_model_parallel_size > 1),
               ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size > 1),
               ("--init-model-with-meta-device", args.init_model_with_meta_device)]
    for flag, bad in refused:
        if bad:
            raise ConfigError(f"{flag}: not supported with {FLAG} in this version (LoRA trains under FSDP2 data "
                              f"parallel only); remove {flag} or the LoRA flags")


def load_base_with_adapters(plan, frozen: set[str]) -> tuple[nn.Module, list[str], int]:
    """The fp32 base model of a LoRA run (its weights from plan.lora_base: an HF folder or an
    mm-convert output) with the adapters on. Returns (model, adapter module paths, trainable count)."""
    from omnitune.checkpoint.mm_load import load_mm_weights
    from omnitune.train.model import apply_freeze, load_hf_model

    kind, path = plan.lora_base
    hf = load_hf_model(plan.family, path if kind == "hf" else None, plan.hf_config, init_weights=kind == "hf")
    if kind == "mm":
        load_mm_weights(path, plan.family, hf)
    apply_freeze(hf, plan.family, frozen)
    names = resolve_targets(hf, plan.family, plan.lora.targets, frozen)
    n = apply_lora(hf, plan.lora, names, plan.args.seed)
    inputs_require_grad(hf, plan.family)
    return hf, names, n


def inputs_require_grad(model: nn.Module, family) -> None:
    """Make the outputs of the input embeddings (text embed_tokens, the audio tower's input conv,
    the vision tower's patch_embed) require grad. With every base weight frozen, a layer's input
    would otherwise require grad on one rank (its micro-batch has an image: vision features with
    adapter gradients are merged in) and not on another (text only); FSDP2 then runs that layer's
    gradient reduce-scatter at a different point of the backward on the two ranks, and the
    collectives deadlock (measured: 2 ranks hung in iteration 3). transformers'
    ``enable_input_require_grads`` covers the embeddings it knows; the patch embedding is added."""
    model.enable_input_require_grads()
    patch = getattr(family.vision_tower(model), "patch_embed", None)
    if patch is not None and not patch._forward_hooks:
        patch.register_forward_hook(lambda module, args, output: output.requires_grad_(True))


def describe(names: list[str], trainable: int, spec: LoraSpec) -> str:
    """The plan / log line: adapters, rank, trainable parameters."""
    return (f"lora       : {len(names)} modules ({' '.join(spec.targets)}), r {spec.r}, alpha {spec.alpha}, "
            f"dropout {spec.dropout}; trainable adapter parameters {trainable:,}")
