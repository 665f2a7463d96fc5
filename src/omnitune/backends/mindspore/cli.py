"""``omnitune train --backend mindspore <training flags>`` (or OMNITUNE_BACKEND=mindspore)."""
from __future__ import annotations

import os
import sys


def train_main(argv: list[str]) -> int:
    from omnitune.backends.mindspore import BackendUnavailable, activate

    try:
        activate()
    except BackendUnavailable as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    from omnitune.backends.mindspore.trainer import Trainer
    from omnitune.config.errors import ConfigError
    from omnitune.data.formats import DataError

    try:
        tr = Trainer(argv)
        if tr.dry_run:
            print("dry run: flags, data.json, model.json and the HF folder are valid for the MindSpore back-end")
            return 0
        # OMNITUNE_GRADS_LOG: append each step's gradient sums (parity tests compare them across back-ends)
        tr.fit(grads_out=os.environ.get("OMNITUNE_GRADS_LOG"))
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"omnitune: error: {e}", file=sys.stderr)
        return 2
    return 0
