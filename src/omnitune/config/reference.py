"""docs/reference.md, generated from the pydantic models (data.json, model.json, TrainArgs) and the
flag tables, so the reference users are pointed to by every error cannot drift from the code.

    python -m omnitune.config.reference            # rewrite docs/reference.md
    python -m omnitune.config.reference --check    # exit 1 when it is out of date (tests do this)
"""
from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

DOC = Path(__file__).resolve().parents[3] / "docs" / "reference.md"

_INTRO = """# omnitune reference

Every data.json and model.json key, every `omnitune train` flag, the loss types and the checkpoint
layout. Generated from the code by `python -m omnitune.config.reference`
(`tests/test_help.py` checks that it is up to date); error messages point here.

Unknown keys and flags are errors naming them. Ranges are checked before anything starts
(`--dry-run` checks the same).
"""

_LOSS = """## Loss types

model.json `loss_cfg.loss_type`, or the flags `--calculate-per-sample-loss` /
`--calculate-per-token-loss` (both given and different: an error). Each is exact across
micro-batches, gradient accumulation and data-parallel ranks.

| loss_type | loss of a step |
|---|---|
| `default` | token mean per micro-batch, then mean over gradient-accumulation steps and ranks |
| `per_sample_loss` | token mean per sample, then mean over the global batch |
| `per_token_loss` | sum over the global batch / its trained tokens |

`loss_cfg.compute_mode` `chunk` / `dynamic_chunk` with `chunk_size` computes lm_head + cross-entropy
one chunk of trained positions at a time (same loss, less memory). `router_aux_loss_coef` adds the
MoE routers' load-balancing loss.
"""

_DPO = """## DPO (preference pairs)

A data.json with `attr.ranking: true` (and `attr.chosen` / `attr.rejected`) trains DPO: each sample
is a prompt (ending with a user turn) with its media and two answers. Per pair, with the
log-probabilities of the answer tokens summed for the policy (pi) and the reference (ref), chosen
(c) and rejected (r), `d = (pi_c - ref_c) - (pi_r - ref_r)`:

| `--dpo-loss-type` | loss of a pair |
|---|---|
| `sigmoid` | `-logsigmoid(beta d) (1 - eps) - logsigmoid(-beta d) eps` (eps: `--dpo-label-smoothing`) |
| `ipo` | `(d' - 1 / (2 beta))^2`, d' as d with each log-prob divided by its answer's token count |
| `hinge` | `relu(1 - beta d)` |

`--pref-ftx` adds that multiple of the chosen answer's token-mean negative log-likelihood. The step's
loss is the mean over the pairs of the global batch (exact across micro-batches, gradient
accumulation and data-parallel ranks; a pair is never split). The reference is, under LoRA, the
policy with its adapters switched off (no second copy; also when `--ref-model` names the LoRA
base), else a frozen copy of `--ref-model` or of the starting weights (`--load`), sharded like the
policy; a resumed run reads the reference its first run recorded. Logged per step (metrics.jsonl,
TensorBoard, the iteration line): `rewards/chosen` = beta (pi_c - ref_c), `rewards/rejected`,
`rewards/margin`, `rewards/accuracy` (share of pairs with chosen > rejected). DPO with
`--context-parallel-size` > 1 is refused in this version.
"""

_CKPT = """## Checkpoint layout (`--save DIR`)

```
DIR/latest_checkpointed_iteration.txt   # the iteration --load DIR resumes from ("50")
DIR/iter_0000050/                       # DCP: .metadata + __*_*.distcp (model, optimizer shards)
    trainer_state.json                  # iteration, consumed samples, schedule, layout
    rng/rank_00000.pt ...               # RNG of every rank (restored only at the same layout)
    data/rank_00000.json ...            # streaming data position per data-parallel rank
DIR/metrics.jsonl                       # one line per step
```

A save is written to `iter_XXXXXXX.partial` and renamed when complete; only then is
`latest_checkpointed_iteration.txt` replaced. Checkpoints are layout-free: a save at one TP/CP/DP
layout resumes at another. `omnitune export --load DIR --save HF_DIR` writes a Hugging Face folder;
`mm-convert ... dcp_to_hf` reads the same folders.

`--load` accepts: a Hugging Face folder (config.json + *.safetensors), a MindSpeed-MM mm checkpoint
(`release/mp_rank_XX/model_optim_rng.pt`, from `mm-convert ... hf_to_mm`), a DCP `release/` folder
(`mm-convert ... hf_to_dcp`), or a save dir to resume.
"""


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        return str(ann).replace("typing.", "")
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _range(field) -> str:
    out = []
    for m in field.metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{op} {getattr(m, attr)}")
    return ", ".join(out)


def _default(field) -> str:
    if field.is_required():
        return "required"
    d = field.get_default(call_default_factory=True)
    if isinstance(d, BaseModel):
        return "(object)"
    return "`null`" if d is None else f"`{d}`".replace("True", "true").replace("False", "false")


def _rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _rows(ann, f"{prefix}{name}.")
            continue
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:   # optional object (model.json image_encoder ...)
            yield from _rows(inner[0], f"{prefix}{name}.")
            continue
        yield (f"`{prefix}{name}`", _type_name(ann), _default(field), _range(field),
               " ".join((field.description or "").split()))


def _table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render() -> str:
    from omnitune.config.data import DataConfig
    from omnitune.config.model import STRUCTURE_KEYS, ModelJson, ModuleConfig
    from omnitune.config.train import GROUPS, IGNORED_FLAGS, NOT_YET_GROUPS, TrainArgs
    from omnitune.data.templates import FAMILY_TEMPLATES

    head = ("key", "type", "default", "range", "meaning")
    parts = [_INTRO, "## data.json\n", _table(head, _rows(DataConfig)), "",
             "Templates per model family (the family comes from the HF folder's config.json):\n",
             _table(("family", "basic_parameters.template"),
                    ((f"`{f}`", ", ".join(f"`{t}`" for t in ts)) for f, ts in FAMILY_TEMPLATES.items())), "",
             "## model.json\n", _table(head, (r for r in _rows(ModelJson)
                                            if not r[0].startswith(("`image_encoder.", "`audio_encoder.",
                                                                    "`text_decoder.")))), "",
             "Modules: `image_encoder.vision_encoder`, `image_encoder.vision_projector`, "
             "`audio_encoder.audio_encoder`, `text_decoder`; each takes:\n",
             _table(head, _rows(ModuleConfig)), "",
             "Structure keys accepted in a module and checked against config.json where the family reports "
             "them: " + ", ".join(f"`{k}`" for k in sorted(STRUCTURE_KEYS)) + ".\n",
             "## Training flags (`omnitune train`, `torchrun ... -m omnitune.train`)\n"]
    fields = TrainArgs.model_fields
    for group in GROUPS:
        rows = [(f"`--{n.replace('_', '-')}`", _type_name(f.annotation), _default(f), _range(f),
                 " ".join(f.description.split()))
                for n, f in fields.items() if f.json_schema_extra["group"] == group]
        parts += [f"### {group}\n", _table(("flag", "type", "default", "range", "meaning"), rows), ""]
    parts += ["`--dry-run`: check the configs and the layout as the run does, print the plan; do not train.\n",
              "Launcher flags of `omnitune train` (torchrun's in the seed scripts): `--nproc-per-node`, "
              "`--nnodes`, `--node-rank`, `--master-addr`, `--master-port`.\n",
              "Accepted and ignored (Megatron kernel / structure flags): "
              + ", ".join(f"`--{f}`" for f in IGNORED_FLAGS) + ".\n"]
    for title, flags in NOT_YET_GROUPS.items():
        parts.append(f"{title}: " + ", ".join(f"`--{f}`" for f in flags) + ".\n")
    parts += [_LOSS, _DPO, _CKPT]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date; run python -m omnitune.config.reference", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(DOC)
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
