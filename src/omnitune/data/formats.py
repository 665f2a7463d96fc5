"""Read dataset files and map each record through data.json ``attr`` to one normalized sample::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "images": [absolute path, ...], "videos": [...], "audios": [...],
     "source": "/abs/file.json", "index": 12}

Preference data (``attr.ranking: true``) ends its conversation with a user turn and adds
``"chosen": str, "rejected": str`` (from the attr.chosen / attr.rejected columns, each a string or
one assistant turn).

mllm JSON (messages/role/content/user/assistant) and sharegpt (conversations/from/value/human/gpt)
are the same mapping with different tag names. A file may be a JSON array or JSONL (one object per
line), whatever its suffix. Every structural problem is an error naming the file and sample index
(the record's position in its file, counting from 0; blank JSONL lines do not count).
"""
from __future__ import annotations

import json
from pathlib import Path

from omnitune.config.data import DataConfig


class DataError(ValueError):
    """A bad sample or dataset file; the message names the file (and sample index)."""


def resolve_dataset_files(cfg: DataConfig) -> list[Path]:
    """Paths of the comma-separated ``dataset`` files.

    A relative name is tried as given (relative to the current directory), then under dataset_dir,
    then as its bare file name under dataset_dir: the MindSpeed-MM guides pair
    ``"dataset_dir": "/home/user/data/"`` with ``"dataset": "./data/file.json"``.
    """
    b = cfg.dataset_param.basic_parameters
    ddir = Path(b.dataset_dir)
    out = []
    for name in b.dataset.split(","):
        p = Path(name)
        candidates = [p] if p.is_absolute() else [p, ddir / p, ddir / p.name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
            raise DataError(f"{cfg.source}: basic_parameters.dataset: file {name!r} not found (tried {tried})")
        out.append(found.resolve())
    return out


def read_records(path: Path) -> list:
    """The records of a JSON-array or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("{"):
            raise DataError(f"{path}: not valid JSON ({e}); use a JSON array of samples or JSONL") from None
        data = None
    if isinstance(data, list):
        return data
    # JSONL lines end at "\n" only: str.splitlines() would also split at characters JSON allows raw
    # inside strings (U+2028, U+0085, ...), which json.dumps(ensure_ascii=False) writes as they are
    if isinstance(data, dict) and "\n" not in text.strip():  # a one-line JSONL file
        return [data]
    if data is None:  # JSONL
        records = []
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}); fix or remove the line") from None
        return records
    raise DataError(f"{path}: expected a JSON array of samples or JSONL, got a JSON {type(data).__name__}")


def _resolve_media(name: str, dataset_dir: Path, data_file: Path) -> Path:
    """dataset_dir/name when that file exists, else name relative to the current directory, else
    relative to the dataset file. A missing file keeps its dataset_dir path (reported later)."""
    p = Path(name)
    if p.is_absolute():
        return p
    for base in (dataset_dir, Path.cwd(), data_file.parent):
        if (base / p).is_file():
            return (base / p).resolve()
    return (dataset_dir / p).resolve()


def normalize(record, index: int, path: Path, cfg: DataConfig) -> dict:
    """Map one record to the normalized sample; check roles alternate and the last turn answers."""
    a = cfg.dataset_param.attr
    where = f"{path}: sample {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get(a.messages)
    if not isinstance(turns, list) or not turns:
        found = "empty" if isinstance(turns, list) else "missing" if turns is None else f"a {type(turns).__name__}"
        hint = "" if a.messages in record else f" (attr.messages is {a.messages!r}; keys here: {sorted(record)})"
        raise DataError(f"{where}: the conversation '{a.messages}' is {found}{hint}")
    roles = {a.user_tag: "user", a.assistant_tag: "assistant"}
    if a.system_tag:
        roles[a.system_tag] = "system"
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or a.role_tag not in turn or a.content_tag not in turn:
            raise DataError(f"{where}: turn {j} needs keys '{a.role_tag}' and '{a.content_tag}' "
                            f"(attr.role_tag / attr.content_tag)")
        role, content = turn[a.role_tag], turn[a.content_tag]
        if role not in roles:
            raise DataError(f"{where}: turn {j} has unknown role {role!r}; expected one of {sorted(roles)} "
                            f"(attr.user_tag / assistant_tag / system_tag)")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {j} content must be a string, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    first = 1 if messages[0]["role"] == "system" else 0
    if first == len(messages):
        raise DataError(f"{where}: empty conversation (only a system prompt)")
    for j in range(first, len(messages)):
        want = "user" if (j - first) % 2 == 0 else "assistant"
        if messages[j]["role"] != want:
            raise DataError(f"{where}: roles must alternate user/assistant after an optional leading system "
                            f"turn; turn {j} is {messages[j]['role']!r}, expected {want!r}")
    if a.ranking and messages[-1]["role"] != "user":
        raise DataError(f"{where}: a preference (attr.ranking) sample's conversation must end with a user turn; "
                        f"the answers go in '{a.chosen}' and '{a.rejected}'")
    if not a.ranking and messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn")
    if a.system and record.get(a.system):
        if first:
            raise DataError(f"{where}: both a system turn and the attr.system column '{a.system}' are given")
        messages.insert(0, {"role": "system", "content": str(record[a.system])})
    ddir = Path(cfg.dataset_param.basic_parameters.dataset_dir)
    media = {kind: _media_column(record, column, kind, where, ddir, path)
             for kind, column in (("images", a.images), ("videos", a.videos), ("audios", a.audios))}
    if a.ranking:
        sample = {"messages": messages, **media, "source": str(path), "index": index}
        return _pair(record, sample, where, a)
    return {"messages": messages, **media, "source": str(path), "index": index}


def _pair(record: dict, sample: dict, where: str, a) -> dict:
    """A preference sample: the prompt conversation plus the chosen and rejected answers, each a
    string or one assistant turn ({role_tag: assistant_tag, content_tag: text})."""
    for key, column in (("chosen", a.chosen), ("rejected", a.rejected)):
        if not column:
            raise DataError(f"{where}: attr.ranking is true but attr.{key} is not set; name the column holding "
                            f"the {key} answer")
        value = record.get(column)
        if isinstance(value, dict):
            if a.role_tag not in value or a.content_tag not in value:
                raise DataError(f"{where}: '{column}' needs keys '{a.role_tag}' and '{a.content_tag}'")
            if value[a.role_tag] != a.assistant_tag:
                raise DataError(f"{where}: '{column}' has role {value[a.role_tag]!r}; expected "
                                f"{a.assistant_tag!r} (attr.assistant_tag)")
            value = value[a.content_tag]
        if not isinstance(value, str):
            found = "missing" if value is None else f"a {type(value).__name__}"
            raise DataError(f"{where}: the {key} answer '{column}' is {found}; give a string or an "
                            f"assistant turn")
        sample[key] = value
    return sample


def _media_column(record: dict, column: str | None, kind: str, where: str, ddir: Path, path: Path) -> list[str]:
    if not column:
        return []
    raw = record.get(column) or []
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise DataError(f"{where}: '{column}' must be a list of {kind[:-1]} paths")
    return [str(_resolve_media(x, ddir, path)) for x in raw]


def load_samples(cfg: DataConfig) -> list[dict]:
    """Normalized samples of all datasets, in file order; max_samples applies per file."""
    max_samples = cfg.dataset_param.basic_parameters.max_samples
    out = []
    for path in resolve_dataset_files(cfg):
        records = read_records(path)[:max_samples]
        out.extend(normalize(r, i, path, cfg) for i, r in enumerate(records))
    return out
