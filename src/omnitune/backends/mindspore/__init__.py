"""MindSpore back-end: omnitune's training on MindSpore through mindnlp's torch layer.

``import mindnlp`` (0.5.1) makes ``import torch`` load ``mindtorch``, a torch API over MindSpore
tensors and kernels, so transformers (4.57.6: mindnlp does not import with transformers 5) runs
its own Qwen2-VL and Qwen2.5-Omni classes on MindSpore. What this folder adds:

- :mod:`.patches`    workarounds for the torch layer's gaps (each tested);
- :mod:`.folders`    transformers-5 HF folders (omnitune's fixtures, exports) read by 4.57;
- :mod:`.processor`  the processor parts the shared data pipeline uses (no torchvision);
- :mod:`.families`   per family: 4.57 class, forward, module names vs the PyTorch path's;
- :mod:`.optim`      torch's AdamW update and gradient clipping, written out;
- :mod:`.randperm`   torch's CPU ``randperm`` in NumPy (the sampler's epoch order);
- :mod:`.ckpt`       portable checkpoints, and reading the PyTorch path's DCP ones;
- :mod:`.trainer`    the loop; :mod:`.cli` ``omnitune train --backend mindspore``.

It is not MindSpeed-Core-MS (Megatron on MindSpore) and uses no Ascend kernel: it needs Ascend's
CANN and sources outside PyPI. Install: ``make mindspore`` (a second venv, ``.venv-ms``).
"""
from __future__ import annotations

import sys

PINNED = ("mindspore==2.7.0", "mindnlp==0.5.1", "transformers==4.57.6")


class BackendUnavailable(RuntimeError):
    pass


def activate() -> None:
    """Load mindnlp (torch -> mindtorch) and the patches. Must run before anything imports torch."""
    t = sys.modules.get("torch")
    if t is not None and "mindtorch" not in (getattr(t, "__file__", "") or ""):
        raise BackendUnavailable("the MindSpore back-end must be chosen before PyTorch is loaded (this process "
                                 "already imported torch); start `omnitune train --backend mindspore` as its own "
                                 "process")
    try:
        import mindnlp  # noqa: F401  (redirects `import torch`)
    except ImportError as e:
        raise BackendUnavailable(f"--backend mindspore needs mindspore + mindnlp ({', '.join(PINNED)}), which this "
                                 f"Python ({sys.executable}) lacks ({e}); run `make mindspore` and use "
                                 f".venv-ms/bin/omnitune") from None
    from omnitune.backends.mindspore import patches
    patches.apply()
