"""Data pipeline: formats -> templates -> media -> dataset -> collator, and the resumable sampler."""
from pathlib import Path

from omnitune.data.collator import Collator
from omnitune.data.dataset import MediaMeta, SampleEncoder, SFTDataset, build_datasets, build_train_dataset
from omnitune.data.formats import DataError
from omnitune.data.sampler import MicroBatchSampler

__all__ = ["Collator", "DataError", "MediaMeta", "MicroBatchSampler", "SampleEncoder", "SFTDataset", "build_datasets",
           "build_train_dataset", "demo_data_dir"]


def demo_data_dir() -> Path:
    """The sample dataset bundled for `make demo`: demo.json (mllm format) + images/."""
    return Path(__file__).resolve().parents[1] / "assets" / "demo_data"
