"""Data pipeline: formats -> templates -> media -> dataset (cached build, or streaming) -> collator, and the
resumable sampler."""
from pathlib import Path

from omnitune.data.collator import Collator
from omnitune.data.dataset import MediaMeta, SampleEncoder, SFTDataset, build_datasets, build_train_dataset
from omnitune.data.formats import DataError
from omnitune.data.sampler import MicroBatchSampler
from omnitune.data.streaming import StreamingSFTDataset, build_streaming_datasets

__all__ = ["Collator", "DataError", "MediaMeta", "MicroBatchSampler", "SampleEncoder", "SFTDataset",
           "StreamingSFTDataset", "build_datasets", "build_streaming_datasets", "build_train_dataset", "demo_data_dir"]


def demo_data_dir() -> Path:
    """The sample dataset bundled for `make demo`: demo.json (mllm format) + images/."""
    return Path(__file__).resolve().parents[1] / "assets" / "demo_data"
