"""The processor parts omnitune's data pipeline uses, built with transformers 4.57.6 under mindnlp.

transformers 4.57's processor classes insist on a video processor, and its video processors need
torchvision, which cannot run on mindnlp's torch layer. The data pipeline only reads the tokenizer,
the image processor (the slow, NumPy one), the audio feature extractor and a few attributes, so it
gets exactly those; a sample with a video is refused by the data pipeline's own check ("needs a
video processor"), naming the sample.
"""
from __future__ import annotations

import json
from pathlib import Path


class MediaProcessor:
    """Tokenizer + image processor (+ audio feature extractor) of an HF folder."""

    video_processor = None

    def __init__(self, folder: str | Path):
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        # transformers 5 nests the parts in processor_config.json; 4.x folders have preprocessor_config.json
        nested = {}
        if (folder / "processor_config.json").is_file():
            nested = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
        ipc = dict(nested.get("image_processor") or {})
        if ipc:
            cls = getattr(transformers, ipc.pop("image_processor_type").removesuffix("Fast"))
            self.image_processor = cls(**ipc)
        else:
            self.image_processor = AutoImageProcessor.from_pretrained(folder, use_fast=False, trust_remote_code=False)
        fec = dict(nested.get("feature_extractor") or {})
        flat = {}
        if (folder / "preprocessor_config.json").is_file():
            flat = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        self.feature_extractor = None
        if fec:
            cls = getattr(transformers, fec.pop("feature_extractor_type"))
            self.feature_extractor = cls(**fec)
        elif flat.get("feature_extractor_type"):
            self.feature_extractor = getattr(transformers, flat["feature_extractor_type"]).from_pretrained(folder)
        for key, default in (("position_id_per_seconds", 25), ("seconds_per_chunk", 2.0)):
            setattr(self, key, nested.get(key, flat.get(key, default)))
        self.model_input_names = list(getattr(self.tokenizer, "model_input_names", ()))
