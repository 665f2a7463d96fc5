"""Images: open with PIL (RGB), size the processor's grid, produce pixel patches.

The grid is computed from the image header alone at build time (to count placeholder tokens and
check lengths without decoding every image), and again by the HF image processor when the sample
is loaded; a disagreement is an error, never a silent misalignment.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from omnitune.data.formats import DataError


def _open(path: str, where: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}: image file not found: {p}")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: image {p} cannot be decoded ({e}); replace or remove it") from None
    return img


def image_size(path: str, where: str) -> tuple[int, int]:
    """(height, width) from the file header; fails on missing/unreadable files."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}: image file not found: {p}")
    try:
        with Image.open(p) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: image {p} cannot be decoded ({e}); replace or remove it") from None
    return h, w


def image_grid(height: int, width: int, image_processor, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid the Qwen image processor will produce for this size."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch, merge = image_processor.patch_size, image_processor.merge_size
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return 1, h // patch, w // patch


def load_images(paths: list[str], where: str, image_processor, min_pixels: int, max_pixels: int):
    """pixel_values [n_patches, C*T*P*P] and image_grid_thw [k, 3] via the HF image processor."""
    images = [_open(p, where).convert("RGB") for p in paths]
    out = image_processor(images=images, size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                          return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]
