"""`mm-convert <Converter> <subcommand> --cfg.* ...` (MindSpeed-MM compatible).

Parsed with jsonargparse ``auto_cli`` over the registered converter classes; each public method is a
subcommand taking one pydantic config, so flags read ``--cfg.parallel_config.llm_pp_layers [[1,1]]``.
``--config file.yaml``, ``--print_config`` and ``JSONARGPARSE_*`` environment variables work as in
jsonargparse. Parsing only; the work is in omnitune.convert.
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    # before torch allocates: large tensors on transparent huge pages (far fewer page faults while
    # converting; torch reads this once)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import jsonargparse

    from pydantic import ValidationError

    from omnitune.convert import converters
    from omnitune.convert.layout import ConvertError

    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    try:  # field help from attribute docstrings, when docstring-parser is installed
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except ImportError:
        pass
    try:
        jsonargparse.auto_cli({c.__name__: c for c in converters()}, as_positional=False, args=argv, prog="mm-convert", env_prefix="MM_CONVERT",
                              default_env=True)
    except (ConvertError, FileNotFoundError) as e:
        print(f"mm-convert: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # a config object refused its values (after parsing)
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            print(f"mm-convert: error: {e.title}{'.' + loc if loc else ''}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
