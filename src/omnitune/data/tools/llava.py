"""LLaVA-Instruct json -> mllm json (images + messages; see docs/reference.md), as MindSpeed-MM's
examples/qwen2vl/llava_instruct_2_mllm_demo_format.py does, with a report of skipped items.

Input items: {id, image?, conversations: [{from: human|gpt, value}]}. Output: one JSON array of
{"images": ["<image_dir>/<image>"] or [], "messages": [{"role": "user"|"assistant", "content"}]};
the ``<image>`` tag stays in the text. Items whose image file is missing are skipped and counted;
a role other than human/gpt is an error naming the item. Written to a temp file, then renamed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from omnitune.fsutil import write_text_atomic

ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class Report:
    written: int = 0
    text_only: int = 0
    skipped_missing_image: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (f"wrote {self.written} samples ({self.text_only} text-only); skipped "
             f"{len(self.skipped_missing_image)} whose image file is missing")
        if self.skipped_missing_image:
            s += ": " + ", ".join(self.skipped_missing_image[:5]) + (" ..." if len(self.skipped_missing_image) > 5 else "")
        return s


def llava_to_mllm(input_json: str | Path, image_dir: str, output_json: str | Path,
                  overwrite: bool = False, progress: bool = True) -> Report:
    from tqdm import tqdm

    src, out = Path(input_json), Path(output_json)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: input file not found (download LLaVA-Instruct-150K json there)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; rename or remove it, or pass --overwrite")
    try:
        items = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{src}: expected a JSON array of items")
    report, result = Report(), []
    for i, item in enumerate(tqdm(items, desc="llava -> mllm", unit="item", disable=not progress)):
        name = f"{src}: item {i} (id {item.get('id')!r})" if isinstance(item, dict) else f"{src}: item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise ValueError(f"{name}: needs a 'conversations' list")
        images = []
        if item.get("image"):
            path = os.path.join(image_dir, item["image"])
            if not os.path.exists(path):
                report.skipped_missing_image.append(path)
                continue
            images = [path]
        else:
            report.text_only += 1
        messages = []
        for j, turn in enumerate(item["conversations"]):
            role = ROLES.get(turn.get("from"))
            if role is None:
                raise ValueError(f"{name}: turn {j} has unknown role {turn.get('from')!r}; expected human or gpt")
            messages.append({"role": role, "content": turn.get("value", "")})
        result.append({"images": images, "messages": messages})
    write_text_atomic(out, json.dumps(result, ensure_ascii=False))
    report.written = len(result)
    return report
