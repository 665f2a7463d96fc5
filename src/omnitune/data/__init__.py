"""Data pipeline: formats -> templates -> media -> dataset (cached build, or streaming) -> collator, and the
resumable sampler.

The names below are imported when first used (``from omnitune.data import Collator``), so importing
one light module of the package (``omnitune.data.formats`` for DataError) does not load torch's
data loader, the dataset and the streaming code at every command's start."""
import importlib
from pathlib import Path

_WHERE = {"Collator": "collator", "MediaMeta": "dataset", "SampleEncoder": "dataset", "SFTDataset": "dataset",
          "build_datasets": "dataset", "build_train_dataset": "dataset", "DataError": "formats",
          "MicroBatchSampler": "sampler", "StreamingSFTDataset": "streaming", "build_streaming_datasets": "streaming"}

__all__ = [*sorted(_WHERE), "demo_data_dir"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"omnitune.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'omnitune.data' has no attribute {name!r}")


def demo_data_dir() -> Path:
    """The sample dataset bundled for `make demo`: demo.json (mllm format) + images/."""
    return Path(__file__).resolve().parents[1] / "assets" / "demo_data"
