"""Training back-ends other than PyTorch. Each lives in its own folder and is imported only when
chosen (``omnitune train --backend NAME`` / ``OMNITUNE_BACKEND=NAME``); the PyTorch path never
imports them."""
