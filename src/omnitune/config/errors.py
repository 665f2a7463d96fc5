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
