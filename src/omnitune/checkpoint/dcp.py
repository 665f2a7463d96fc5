"""Training checkpoints with torch.distributed.checkpoint (DCP).

Layout (Megatron-compatible names)::

    <save>/latest_checkpointed_iteration.txt      # "5"
    <save>/iter_0000005/                          # DCP files: model (+ optimizer) shards
        .metadata, __*_*.distcp
        trainer_state.json                        # iteration, consumed samples, schedule, flags
        rng/rank_00000.pt ...                     # RNG of every rank (torch, cuda/npu, python, numpy)
        data/rank_00000.json ...                  # streaming data position of every data-parallel rank

Layout-free: DCP stores every tensor with its global shape, whatever TP/EP/FSDP placement it had;
loading reshards to the loading job's placements, so a save at DP2 x TP2 resumes at DP4 or in one
process. The RNG files are per rank of one layout: they are restored only when the layout (world
size, TP, CP, EP) is the saved one. The data position is per data-parallel rank (``data_rank``).

A save writes into ``iter_XXXXXXX.partial`` and is renamed when every rank has finished; only then
is ``latest_checkpointed_iteration.txt`` replaced (temp file + rename). A save that dies midway
leaves the previous checkpoint and the ``latest`` pointer untouched. A write that fails (disk full,
read-only) is one error on every rank saying what is left and what ``latest`` still names.

Reading goes through ``checkpoint.safe_dcp``: no code from the folder, damaged files named.

An iteration folder may instead hold the portable form (checkpoint/portable.py: safetensors files,
written by the MindSpore back-end): resume and export read it too.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from omnitune.checkpoint import portable, safe_dcp
from omnitune.checkpoint.portable import LATEST, STATE, iter_dir_name  # noqa: F401  (shared with portable)
from omnitune.checkpoint.safe_dcp import CheckpointError
from omnitune.fsutil import write_text_atomic


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    st["numpy"] = [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    if hasattr(torch, "npu") and torch.npu.is_available():
        st["npu"] = torch.npu.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if "npu" in st and hasattr(torch, "npu") and torch.npu.is_available():
        torch.npu.set_rng_state(st["npu"])


# ------------------------------------------------------------------ strided shards
# TP's fused vision qkv is a DTensor with a _StridedShard placement (each rank holds a third of q, k
# and v). DCP (torch 2.14) describes such a shard as one contiguous chunk and its plan check fails
# ("overlapping chunks"). Those few tensors are saved whole (replicated: written once) and, on load,
# read whole into a temporary and sliced into the rank's shard. Everything else keeps DCP's
# shard-wise I/O.

def _is_strided(v) -> bool:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard
    return isinstance(v, DTensor) and any(isinstance(p, _StridedShard) for p in v.placements)


def _walk(tree, fn):
    """Apply ``fn(container, key, value)`` to every leaf of nested dicts/lists."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _walk(v, fn)
        else:
            fn(tree, k, v)


def strided_to_full(tree):
    """Collective: a copy of ``tree`` (nested dicts/lists) with every strided-sharded DTensor
    replaced by its full tensor. A copy: the optimizer state dict shares its per-parameter dicts
    with the optimizer, which must keep its DTensors."""
    if isinstance(tree, dict):
        return {k: strided_to_full(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [strided_to_full(v) for v in tree]
    return _full_strided(tree) if _is_strided(tree) else tree


def _full_strided(v) -> torch.Tensor:
    """The global tensor of a strided-sharded DTensor. Not ``full_tensor()``: in torch 2.14 it
    puts the rows of a _StridedShard on a TP-sharded dim in the wrong order (measured: a DP2 x TP2
    checkpoint's vision qkv differed from the one-process run's by 1.7x its max). Each rank's
    local block goes where its placements say (the index rule the loader uses, so save and load
    agree)."""
    import itertools

    from omnitune.checkpoint.sharded_load import local_index_from

    mesh = v.device_mesh
    # gathered over the tensor's own mesh, one dimension at a time (the last first), so ranks of
    # other meshes (other pipeline stages) take no part: gathered[c0][c1]... is coordinate c's block
    gathered = v._local_tensor.detach().contiguous().cpu()
    for d in reversed(range(mesh.ndim)):
        out = [None] * mesh.shape[d]
        dist.all_gather_object(out, gathered, group=mesh.get_group(d))
        gathered = out
    full = torch.empty(tuple(v.shape), dtype=v.dtype)
    for coord in itertools.product(*(range(n) for n in mesh.shape)):
        idx = local_index_from(tuple(v.shape), tuple(mesh.shape), coord, v.placements)
        idx = [torch.arange(n) if ix is None else ix for ix, n in zip(idx, v.shape)]
        block = gathered
        for c in coord:
            block = block[c]
        full[torch.meshgrid(*idx, indexing="ij")] = block
    return full.to(v._local_tensor.device)


def strided_placeholders(state: dict) -> list:
    """Replace every strided-sharded DTensor by an empty full-size tensor for dcp.load; returns what
    :func:`fill_strided` needs to slice the loaded values back into the DTensors (and to put the
    DTensors back where they were: the containers may be the optimizer's own state dicts)."""
    todo = []

    def fn(c, k, v):
        if _is_strided(v):
            full = torch.empty(v.shape, dtype=v.dtype, device=v._local_tensor.device)
            c[k] = full
            todo.append((c, k, v, full))
    _walk(state, fn)
    return todo


def fill_strided(todo: list) -> None:
    from omnitune.checkpoint.sharded_load import gather, local_index

    for c, k, v, full in todo:
        idx, local = local_index(v)
        local.copy_(gather(full, idx))
        c[k] = v


def save_checkpoint(save_dir: str | Path, iteration: int, model, optimizer, trainer_state: dict,
                    save_optim: bool = True, save_rng: bool = True, data_state: dict | None = None,
                    data_rank: int | None = None, layout: dict | None = None, key_filter=None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. ``data_state``: the data
    position (a JSON-able dict; the streaming dataset's) of data-parallel rank ``data_rank`` (default:
    the global rank), read back by :func:`read_data_state`; the ranks of one data-parallel rank hold
    the same position, so only those that pass it write it (one per data rank). ``layout``: the
    parallel sizes, recorded in trainer_state.json (RNG is restored only at the same layout).
    ``key_filter(name) -> bool``: save only these model tensors (LoRA: the adapters)."""
    import torch.distributed.checkpoint as dcp   # lazy: seconds of import, only when a checkpoint is used
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    save = Path(save_dir)
    final = save / iter_dir_name(iteration)
    partial = save / (iter_dir_name(iteration) + ".partial")
    fail = _SaveFailure(save, final, partial)

    def prepare():
        save.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    fail.agree(_attempt(prepare) if _rank() == 0 else None)
    state = {"model": model_state(model, key_filter)}
    if save_optim and optimizer is not None:
        state["optim"] = optim_state(model, optimizer)
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dcp.save(strided_to_full(state), checkpoint_id=str(partial))
    except CheckpointException as e:  # collective: every rank gets it
        cause = safe_dcp.root_cause(e)
        if isinstance(cause, OSError):
            raise fail.error(cause) from None
        raise

    def own_files():
        if save_rng:
            (partial / "rng").mkdir(exist_ok=True)
            torch.save(rng_state(), partial / "rng" / f"rank_{_rank():05d}.pt")
        if data_state is not None:
            (partial / "data").mkdir(exist_ok=True)
            r = _rank() if data_rank is None else data_rank
            write_text_atomic(partial / "data" / f"rank_{r:05d}.json", json.dumps(data_state))
    fail.agree(_attempt(own_files))

    def publish():
        meta = dict(trainer_state, iteration=iteration, has_optim=bool(save_optim and optimizer is not None),
                    optim_format="flat",
                    has_rng=save_rng, has_data_state=(partial / "data").is_dir(),
                    world_size=dist.get_world_size() if dist.is_initialized() else 1)
        if layout is not None:
            meta["layout"] = layout
        (partial / STATE).write_text(json.dumps(meta, indent=2))
        if final.exists():  # re-saving the same iteration: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(save / LATEST, str(iteration))
    fail.agree(_attempt(publish) if _rank() == 0 else None)
    return final


def _attempt(fn) -> OSError | None:
    """Run ``fn``; the OSError it raised (disk full, read-only, ...) or None. Other errors pass."""
    try:
        fn()
    except OSError as e:
        return e
    return None


def _latest_or_none(save: Path) -> str | None:
    try:
        text = read_latest(save) if (save / LATEST).is_file() else None
    except CheckpointError:
        return None
    return None if text is None else ("release" if text == "release" else iter_dir_name(int(text)))


class _SaveFailure:
    """A failed write during a save, said the way a user can act on it: what is left on disk and
    what ``latest`` still points at (the save is write-then-rename, so nothing earlier is lost)."""

    def __init__(self, save: Path, final: Path, partial: Path):
        self.save, self.final, self.partial = save, final, partial

    def error(self, e: OSError) -> CheckpointError:
        full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        what = "disk full" if full else f"cannot write ({e.strerror or e})"
        if self.partial.exists():
            left = f"{self.partial.name} left"
        elif self.final.exists():
            left = f"{self.final.name} written but not made the latest"
        else:
            left = "nothing of it written"
        now = _latest_or_none(self.save)
        if now is not None:
            keep = f"{LATEST} still names {now}"
            fix = f"resume with --load {self.save}"
        else:
            keep = "no earlier checkpoint"
            fix = "run again"
        todo = "free space" if full else f"make {self.save} writable"
        return CheckpointError(f"--save {self.save}: {what} while saving {self.final.name}: {left}, {keep}; "
                               f"{todo} and {fix}")

    def agree(self, err: OSError | None) -> None:
        """Collective (replaces a barrier): every rank raises when any rank's step failed, so no
        rank waits forever for one that gave up."""
        msg = str(self.error(err)) if err is not None else None
        if dist.is_initialized():
            msgs = [None] * dist.get_world_size()
            dist.all_gather_object(msgs, msg)
            msg = next((m for m in msgs if m), None)
        if msg:
            raise CheckpointError(msg)


def check_save_dir(path: str | Path, flag: str = "--save") -> None:
    """Before any work: ``path`` (made if missing) can hold files. Probed by creating and removing a
    file in it, or in its nearest existing parent (a read-only mount refuses root too, which
    ``os.access`` does not see)."""
    p = Path(path)
    probe_dir = p
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise CheckpointError(f"{flag} {path}: {probe_dir} is not a folder; give a folder path for the checkpoints")
    try:
        fd, name = tempfile.mkstemp(prefix=".omnitune-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise CheckpointError(f"{flag} {path}: {probe_dir} is not writable ({e.strerror or e}); give a folder on "
                              f"a writable file system, or fix its permissions") from None


def tied_aliases(model) -> dict[str, str]:
    """{state-dict key: key it is tied to}: parameters reachable under two names (a tied lm_head /
    embedding: one tensor), and the model's declared ties (transformers' ``all_tied_weights_keys``,
    also when a plan left them two tensors equal by value). The alias is not stored."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    names = set(first.values()) | set(out)
    for tgt, src in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tgt in names and src in names and tgt != src and src not in out:
            out.setdefault(tgt, src)
    return out


def _parts(model) -> list:
    """A model, or the list of a pipeline rank's stage models (parallel/pp.py)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def stage_tie_renames(model) -> dict[str, str]:
    """{name here: name in checkpoints} for a tied weight whose source module another pipeline stage
    holds (the last stage's lm_head.weight is saved as the embedding it is tied to)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    out = {}
    for tgt, src in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tgt in names and src not in names:
            out[tgt] = src
    return out


def model_state(model, key_filter=None, options=None) -> dict:
    """The model part of a checkpoint: every weight once. A tied weight is saved under its source
    name only (checkpoints written before held it twice; loading them reads the source name and
    ignores the copy); :func:`with_aliases` puts the alias back before ``set_model_state_dict``.
    ``model`` may be a list of pipeline stage models: their (disjoint) tensors, merged."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out = {}
    for part in _parts(model):
        sd = get_model_state_dict(part, options=options)
        for alias in tied_aliases(part):
            sd.pop(alias, None)
        for here, there in stage_tie_renames(part).items():
            if here in sd:
                sd[there] = sd.pop(here)
        out.update(sd)
    return out if key_filter is None else {k: v for k, v in out.items() if key_filter(k)}


def with_aliases(model, sd: dict) -> dict:
    """``sd`` with every tied alias mapped to its source's tensor (for ``set_model_state_dict``)."""
    for here, there in stage_tie_renames(model).items():
        if there in sd:
            sd[here] = sd.pop(there)
    for alias, src in tied_aliases(model).items():
        if src in sd:
            sd[alias] = sd[src]
    return sd


def _part_sd(part, sd: dict) -> dict:
    """The entries of a merged state dict that belong to ``part`` (a pipeline stage model)."""
    names = set(part.state_dict().keys()) | set(stage_tie_renames(part).values())
    return {k: v for k, v in sd.items() if k in names}


def _optim_key_rename(key: str, renames: dict[str, str]) -> str:
    """A flat optimizer key ``state.<fqn>.<field>`` / ``param_groups.<fqn>.<field>`` with ``fqn`` renamed."""
    for here, there in renames.items():
        for head in ("state.", "param_groups."):
            if key.startswith(head + here + "."):
                return head + there + key[len(head + here):]
    return key


def optim_state(model, optimizer, flat: bool = True) -> dict:
    """Optimizer part of a checkpoint. ``flat`` (what saves write): one key per parameter and field
    (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``), so the pipeline stages' optimizers merge
    and any layout reads them; ``flat=False``: the nested form of earlier checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    parts, opts = _parts(model), _parts_opt(optimizer)
    if not flat:
        return get_optimizer_state_dict(parts[0], opts[0])
    out = {}
    for part, opt in zip(parts, opts):
        if opt is None:
            continue
        osd = get_optimizer_state_dict(part, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        renames = stage_tie_renames(part)
        out.update({_optim_key_rename(k, renames): v for k, v in osd.items()})
    return out


def set_optim_state(model, optimizer, osd: dict, flat: bool = True) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    parts, opts = _parts(model), _parts_opt(optimizer)
    if not flat:
        set_optimizer_state_dict(parts[0], opts[0], osd)
        return
    for part, opt in zip(parts, opts):
        if opt is None:
            continue
        back = {v: k for k, v in stage_tie_renames(part).items()}
        mine = get_optimizer_state_dict(part, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        wanted = {_optim_key_rename(k, stage_tie_renames(part)) for k in mine}
        sub = {_optim_key_rename(k, back): v for k, v in osd.items() if k in wanted}
        set_optimizer_state_dict(part, opt, sub, options=StateDictOptions(flatten_optimizer_state_dict=True))


def _parts_opt(optimizer) -> list:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def is_training_checkpoint_root(path: str | Path) -> bool:
    return (Path(path) / LATEST).is_file()


def read_latest(root: str | Path) -> str:
    """``latest_checkpointed_iteration.txt``: an iteration number or ``release`` (CheckpointError
    naming the file otherwise: it is edited by hand)."""
    return portable.read_latest(root, error=CheckpointError)


def resolve_checkpoint(load_dir: str | Path) -> Path:
    """The iteration folder named by ``latest_checkpointed_iteration.txt`` (editable by hand)."""
    root = Path(load_dir)
    text = read_latest(root)
    name = "release" if text == "release" else iter_dir_name(int(text))
    ckpt = root / name
    if not ((ckpt / ".metadata").is_file() or portable.is_portable(ckpt)):
        raise FileNotFoundError(f"{root / LATEST} names iteration {text!r} but {ckpt} is not a complete "
                                f"checkpoint (no .metadata). Point the file at an existing iter_* folder.")
    return ckpt


def read_trainer_state(ckpt: Path) -> dict:
    """trainer_state.json of an iteration folder ({"iteration": 0} when there is none, as in a
    ``release`` folder); CheckpointError naming the file when it is not a JSON object."""
    p = Path(ckpt) / STATE
    if not p.is_file():
        return {"iteration": 0}
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e}); the checkpoint is damaged: copy it again, or point "
                              f"{Path(ckpt).parent / LATEST} at another iteration") from None
    if not isinstance(state, dict) or not isinstance(state.get("iteration", 0), int):
        raise CheckpointError(f"{p}: not an omnitune trainer state (a JSON object with an integer 'iteration'); "
                              f"the checkpoint is damaged: copy it again, or point {Path(ckpt).parent / LATEST} "
                              f"at another iteration")
    return state


def check_checkpoint(ckpt: str | Path) -> dict:
    """Everything a resume or export reads before it reads it, file by file: ``.metadata`` (no
    code, a DCP ``Metadata``), the data files it lists (present, not truncated) and
    trainer_state.json. Returns the trainer state. Cheap: no tensor is read. A portable folder:
    its trainer_state.json and model file."""
    if portable.is_portable(ckpt):
        return read_trainer_state(Path(ckpt))
    safe_dcp.read_metadata(ckpt)
    return read_trainer_state(Path(ckpt))


def read_data_state(ckpt: str | Path, rank: int | None = None) -> dict | None:
    """The data position this rank (or ``rank``) saved in ``ckpt``; None when none was saved."""
    f = Path(ckpt) / "data" / f"rank_{_rank() if rank is None else rank:05d}.json"
    if not f.is_file():
        if (Path(ckpt) / "data").is_dir():
            raise FileNotFoundError(f"{ckpt}/data holds no position for rank {_rank() if rank is None else rank} "
                                    f"(saved with fewer ranks?); resume with the number of ranks it was saved with")
        return None
    return json.loads(f.read_text())


def load_checkpoint(ckpt: str | Path, model, optimizer, load_optim: bool = True,
                    load_rng: bool = True, layout: dict | None = None, key_filter=None) -> dict:
    """Collective. Loads model (+ optimizer, + this rank's RNG) in place; returns trainer state with
    ``rng_restored``. Works across world sizes and layouts: DCP reshards. RNG: only when ``layout``
    (this job's parallel sizes) equals the saved one (a rank's RNG means nothing in another layout).
    ``key_filter``: the model tensors the checkpoint holds (LoRA: the adapters; the rest stays)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    ckpt = Path(ckpt)
    meta = read_trainer_state(ckpt)
    state = {"model": model_state(model, key_filter)}
    want_optim = load_optim and optimizer is not None
    if want_optim and not meta.get("has_optim", False):
        raise ValueError(f"{ckpt} holds no optimizer state (saved with --no-save-optim); "
                         f"resume with --no-load-optim")
    flat = meta.get("optim_format") == "flat"   # earlier checkpoints: nested
    if want_optim:
        if not flat and len(_parts(model)) > 1:
            raise ValueError(f"{ckpt} holds its optimizer state in the nested form of earlier versions, which "
                             f"pipeline stages cannot split; resume it once without pipeline parallelism and "
                             f"save, or resume with --no-load-optim")
        state["optim"] = optim_state(model, optimizer, flat=flat)
    if portable.is_portable(ckpt):   # whole tensors: each rank copies its shards
        portable.fill(ckpt, state)
    else:
        todo = strided_placeholders(state)
        safe_dcp.load(state, ckpt)
        fill_strided(todo)
    for part in _parts(model):
        set_model_state_dict(part, with_aliases(part, _part_sd(part, state["model"])),
                             options=StateDictOptions(strict=key_filter is None))
    if want_optim:
        set_optim_state(model, optimizer, state["optim"], flat=flat)
    meta["rng_restored"] = False
    saved_layout = meta.get("layout") or {"world": meta.get("world_size", 1), "tp": 1, "cp": 1, "ep": 1, "pp": 1}
    same = layout is None or saved_layout == layout
    if load_rng and meta.get("has_rng", False) and same:
        f = ckpt / "rng" / f"rank_{_rank():05d}.pt"
        if f.is_file():
            set_rng_state(torch.load(f, weights_only=True))
            meta["rng_restored"] = True
    return meta


def load_model_weights_from_dcp(ckpt: str | Path, model, key_filter=None) -> None:
    """Single-process load of the model part of a checkpoint into a plain (unsharded) model
    (``key_filter``: only the tensors it accepts, e.g. a LoRA checkpoint's adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    sd = model_state(model, key_filter, options=StateDictOptions())
    if portable.is_portable(ckpt):
        portable.fill(ckpt, {"model": sd})
    else:
        safe_dcp.load({"model": sd}, ckpt, no_dist=True)
    set_model_state_dict(model, with_aliases(model, sd), options=StateDictOptions(strict=key_filter is None))
