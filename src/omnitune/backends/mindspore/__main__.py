"""``python -m omnitune.backends.mindspore <training flags>``: the same as
``omnitune train --backend mindspore <training flags>``."""
import sys

from omnitune.backends.mindspore.cli import train_main

sys.exit(train_main(sys.argv[1:]))
