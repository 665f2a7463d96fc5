"""One error type for bad configuration, raised before anything is launched or written, and the
wording of pydantic's errors as a user reads them (the flag as typed, the file and key path)."""
from __future__ import annotations

#: where every accepted key, flag, loss type and the checkpoint layout are documented
REFERENCE = "docs/reference.md"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the file/flag/field."""


def flag_of(field: str) -> str:
    """``micro_batch_size`` -> ``--micro-batch-size`` (the flag as the user types it)."""
    return "--" + field.replace("_", "-")


def _describe(err: dict) -> str:
    """What is wrong, in plain words: 'expected an integer, got 'abc'', 'must be >= 1, got -2'."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing (required)"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {got!r}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {got!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got!r}"
    if kind in ("string_type",):
        return f"expected a string, got {got!r}"
    if kind in ("list_type",):
        return f"expected a list, got {got!r}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected an object ({{...}}), got {got!r}"
    if kind == "none_required":
        return f"must be null (not used by these models), got {got!r}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {got!r}"
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if kind == {"ge": "greater_than_equal", "gt": "greater_than", "le": "less_than_equal",
                    "lt": "less_than"}[key]:
            return f"must be {op} {ctx.get(key)}, got {got}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _path(loc) -> str:
    """A key path of a JSON file (``dataset_param.basic_parameters.dataset``); pydantic's union
    branch names (``int``, ``function-after[...]``) are not keys and are left out."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and ("[" in x or x in ("int", "float", "str",
                                                                                            "bool", "none"))))


def format_validation_error(e, source: str) -> str:
    """Turn a pydantic ValidationError into one line: the first problem (and how many more), so the
    error stays the one line users read. ``source`` "flags": ``--flag: what is wrong``; else (a
    file): ``source: key.path: what is wrong`` (a problem of the whole file: ``source: message``)."""
    lines, seen = [], set()
    for err in e.errors():
        loc, what = _path(err["loc"]), _describe(err)
        if source == "flags":
            line = f"{flag_of(loc)}: {what}" if loc else what
        else:
            line = f"{source}: {loc}: {what}" if loc else f"{source}: {what}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    more = f" (and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''})" if len(lines) > 1 else ""
    return lines[0] + more


def load_json_model(path, model_cls, flag: str):
    """Read a JSON config file and validate it with pydantic ``model_cls``; every failure is a
    ConfigError naming the file (and, for validation, the key path)."""
    import json
    from pathlib import Path

    from pydantic import ValidationError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: file not found; give the path of an existing file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}; fix the file (see {REFERENCE})") from None
    try:
        return model_cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(p)) + f"; see {REFERENCE}") from None
