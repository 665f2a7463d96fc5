"""RLHF-V (HF dataset folder or parquet files) -> DPO pairs json (attr.ranking, docs/reference.md), like
MindSpeed-MM's examples/qwen2vl/rlhfv_2_sharegpt_demo_format.py, with a report of skipped items.

Input rows: conversations [{from, value}], chosen {from, value}, rejected {from, value},
images [{bytes, path}]. Output: one JSON array of
{"messages": [{"role": "user", "content": ...}], "chosen": {"role": "assistant", "content": ...},
 "rejected": {...}, "images": ["<image_dir>/0000.jpg"]}.
A row with a missing key, no image or an undecodable image is skipped; the report says which and why.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from omnitune.fsutil import write_text_atomic

REQUIRED = ("conversations", "chosen", "rejected", "images")


@dataclass
class Report:
    written: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        s = f"wrote {self.written} pairs; skipped {len(self.skipped)}"
        if self.skipped:
            s += ": " + "; ".join(f"item {i}: {why}" for i, why in self.skipped[:5])
            s += " ..." if len(self.skipped) > 5 else ""
        return s


def _load_rows(source: str | Path):
    import datasets

    src = Path(source)
    if src.is_file() and src.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(src), split="train")
    if src.is_dir():
        if (src / "dataset_info.json").is_file() and (src / "state.json").is_file():
            return datasets.load_from_disk(str(src))
        files = sorted(str(p) for p in src.rglob("*.parquet"))
        if files:
            return datasets.load_dataset("parquet", data_files=files, split="train")
    raise FileNotFoundError(f"{src}: expected a .parquet file, a folder of parquet files, or a "
                            f"datasets.save_to_disk folder (RLHF-V downloaded from the HF hub)")


def rlhfv_to_dpo(source: str | Path, image_dir: str | Path, output_json: str | Path,
                 overwrite: bool = False, progress: bool = True) -> Report:
    from PIL import Image
    from tqdm import tqdm

    out, image_dir = Path(output_json), Path(image_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; rename or remove it, or pass --overwrite")
    rows = _load_rows(source)
    image_dir.mkdir(parents=True, exist_ok=True)
    report, result = Report(), []
    for index, item in enumerate(tqdm(rows, desc="rlhf-v -> dpo", unit="item", disable=not progress)):
        missing = [k for k in REQUIRED if not item.get(k)]
        if missing:
            report.skipped.append((index, f"missing or empty {', '.join(missing)}"))
            continue
        data = item["images"][0].get("bytes") if isinstance(item["images"][0], dict) else None
        if not data:
            report.skipped.append((index, "no image bytes"))
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        except Exception as e:  # PIL raises many types for corrupt data
            report.skipped.append((index, f"image cannot be decoded ({type(e).__name__})"))
            continue
        path = image_dir / f"{index:04d}.jpg"
        path.write_bytes(data)
        result.append({
            "messages": [{"role": "user", "content": item["conversations"][0]["value"]}],
            "chosen": {"role": "assistant", "content": item["chosen"]["value"]},
            "rejected": {"role": "assistant", "content": item["rejected"]["value"]},
            "images": [str(path)],
        })
    write_text_atomic(out, json.dumps(result, ensure_ascii=False, indent=2))
    report.written = len(result)
    return report
