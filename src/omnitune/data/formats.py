"""Read dataset files and map them through data.json ``attr`` to one normalized form::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "images": [abs path, ...],
     "source": "file.json", "index": 12}

mllm JSON (messages/role/content/user/assistant) and sharegpt (conversations/from/value/human/gpt)
are both this mapping with different tag names. JSON arrays and JSONL files are accepted.
Every structural problem is an error naming the file and the sample index.
"""
from __future__ import annotations

import json
from pathlib import Path

from omnitune.config.data import DataConfig


class DataError(ValueError):
    """A bad sample or dataset file; the message names the file (and sample index)."""


def resolve_dataset_files(cfg: DataConfig) -> list[Path]:
    b = cfg.dataset_param.basic_parameters
    out = []
    for name in b.dataset.split(","):
        p = Path(name)
        candidates = [p] if p.is_absolute() else [p, Path(b.dataset_dir) / p, Path(b.dataset_dir) / p.name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"{cfg.source}: basic_parameters.dataset: file {name!r} not found "
                            f"(looked at {', '.join(str(c) for c in candidates)})")
        out.append(found.resolve())
    return out


def read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i + 1} is not valid JSON ({e.msg}); fix or remove the line") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); use a JSON array or a .jsonl file") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of samples, got {type(data).__name__}")
    return data


def _resolve_media(name: str, dataset_dir: Path, data_file: Path) -> Path:
    p = Path(name)
    if p.is_absolute():
        return p
    for base in (dataset_dir, Path.cwd(), data_file.parent):
        if (base / p).is_file():
            return (base / p).resolve()
    return (dataset_dir / p).resolve()  # missing: reported when the sample is built


def normalize(record: dict, index: int, path: Path, cfg: DataConfig) -> dict:
    a = cfg.dataset_param.attr
    where = f"{path}: sample {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    turns = record.get(a.messages)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{a.messages}' is missing or empty (attr.messages)")
    roles = {a.user_tag: "user", a.assistant_tag: "assistant"}
    roles[a.system_tag or "system"] = "system"
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or a.role_tag not in turn or a.content_tag not in turn:
            raise DataError(f"{where}: turn {j} needs '{a.role_tag}' and '{a.content_tag}' (attr.role_tag/content_tag)")
        role = turns[j][a.role_tag]
        if role not in roles:
            raise DataError(f"{where}: turn {j} has unknown role {role!r}; expected one of {sorted(roles)}")
        content = turn[a.content_tag]
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {j} content must be a string")
        messages.append({"role": roles[role], "content": content})
    if a.system and record.get(a.system):
        messages.insert(0, {"role": "system", "content": record[a.system]})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise DataError(f"{where}: a system turn may only come first")
    if not body:
        raise DataError(f"{where}: empty conversation")
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise DataError(f"{where}: roles must alternate user/assistant; turn {j} is {m['role']!r}, "
                            f"expected {want!r}")
    if body[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn")
    images = []
    if a.images:
        raw = record.get(a.images) or []
        if isinstance(raw, str):
            raw = [raw]
        ddir = Path(cfg.dataset_param.basic_parameters.dataset_dir)
        images = [str(_resolve_media(x, ddir, path)) for x in raw]
    return {"messages": messages, "images": images, "source": str(path), "index": index}


def load_samples(cfg: DataConfig) -> list[dict]:
    """All normalized samples of the comma-separated datasets; max_samples applies per file."""
    max_samples = cfg.dataset_param.basic_parameters.max_samples
    out = []
    for path in resolve_dataset_files(cfg):
        records = read_records(path)
        if max_samples is not None:
            records = records[:max_samples]
        out.extend(normalize(r, i, path, cfg) for i, r in enumerate(records))
    return out
