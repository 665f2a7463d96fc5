"""HF folders written by transformers 5 (omnitune's tiny fixtures, its exports) read by the
transformers 4.57.6 that mindnlp needs.

Hub folders of Qwen2-VL / Qwen2.5-Omni were written by transformers 4 and load as they are. A folder
saved by transformers 5 differs in two places 4.57 cannot read: ``rope_parameters`` (4.x:
``rope_theta`` + ``rope_scaling``) in config.json, and ``extra_special_tokens`` as a list in
tokenizer_config.json (4.x: a dict; the list is ``additional_special_tokens``). :func:`hf4_view`
gives a folder 4.57 reads: the folder itself when nothing needs rewriting, else a view in ``cache``
(default ~/.cache/omnitune/hf4) with the rewritten JSON files and links to every other file (weights are never copied).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omnitune.fsutil import atomic_dir

_REWRITTEN = ("config.json", "tokenizer_config.json")


def _rope_v4(node):
    """Every ``rope_parameters`` dict of a config tree turned into 4.x ``rope_theta`` / ``rope_scaling``."""
    if isinstance(node, list):
        return [_rope_v4(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rope_v4(v) for k, v in node.items()}
    rp = out.pop("rope_parameters", None)
    if isinstance(rp, dict):
        rp = dict(rp)
        if "rope_theta" in rp:
            out.setdefault("rope_theta", rp.pop("rope_theta"))
        kind = rp.pop("rope_type", "default")
        if kind != "default" or rp:   # (4.x reads "mrope_section" from rope_scaling, "type" or "rope_type")
            out.setdefault("rope_scaling", {"type": kind, "rope_type": kind, **rp})
    return out


def _tokenizer_v4(cfg: dict) -> dict:
    cfg = dict(cfg)
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        cfg.pop("extra_special_tokens")
        if extra:
            cfg["additional_special_tokens"] = list(cfg.get("additional_special_tokens") or []) + \
                [t for t in extra if t not in (cfg.get("additional_special_tokens") or [])]
    return cfg


def rewrites(folder: str | os.PathLike) -> dict[str, dict]:
    """The JSON files of ``folder`` that 4.57 cannot read as they are, rewritten (name -> content)."""
    folder = Path(folder)
    out = {}
    for name, fix in (("config.json", _rope_v4), ("tokenizer_config.json", _tokenizer_v4)):
        f = folder / name
        if not f.is_file():
            continue
        cfg = json.loads(f.read_text(encoding="utf-8"))
        new = fix(cfg)
        if new != cfg:
            out[name] = new
    return out


def hf4_view(folder: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """``folder`` if transformers 4.57 reads it as it is; else a view of it that it reads (see module doc)."""
    folder = Path(folder).resolve()
    fixed = rewrites(folder)
    if not fixed:
        return folder
    key = hashlib.sha256(json.dumps([str(folder), fixed], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache) if cache is not None else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omnitune" / "hf4"
    view = root / f"{folder.name}-{key}"
    if (view / "config.json").is_file():
        return view
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(view) as tmp:
        tmp = Path(tmp)
        for f in folder.iterdir():
            if f.name in fixed:
                (tmp / f.name).write_text(json.dumps(fixed[f.name], indent=2), encoding="utf-8")
            else:
                os.symlink(f, tmp / f.name)
    return view
