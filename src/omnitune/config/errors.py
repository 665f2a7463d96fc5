"""One error type for bad configuration, raised before anything is launched or written."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the file/flag/field."""


def format_validation_error(e, source: str) -> str:
    """Turn a pydantic ValidationError into one line per problem: `source: a.b.c: message`."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def load_json_model(path, model_cls, flag: str):
    """Read a JSON config file and validate it with pydantic ``model_cls``; every failure is a
    ConfigError naming the file (and, for validation, the key path)."""
    import json
    from pathlib import Path

    from pydantic import ValidationError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: file not found: {p}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    try:
        return model_cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(p))) from None
