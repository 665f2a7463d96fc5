"""Images: open with PIL, convert to RGB, patchify with the HF image processor.

Pixel bounds (data.json image_min_pixels / image_max_pixels) are passed at call time as
``size={"shortest_edge": min, "longest_edge": max}``, so the processor folder's own defaults never
decide them. The HF processor reads a minimum of 0 (MindSpeed-MM's examples use it) as unset, so
the dataset passes at least 1, which resizes identically except that no side can round to 0.
The patch grid is also computed from the image header alone (:func:`image_grid`), which
lets the dataset count placeholder tokens and check lengths at build time without decoding pixels.
Every failure names the image, the dataset file and the sample index (``where``).
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from omnitune.data.formats import DataError


def _check_exists(path: str, where: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}: image file not found: {p}")
    return p


def image_size(path: str, where: str) -> tuple[int, int]:
    """(height, width) read from the file header."""
    p = _check_exists(path, where)
    try:
        with Image.open(p) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: image {p} cannot be decoded ({e}); replace or remove it") from None
    return h, w


def open_rgb(path: str, where: str) -> Image.Image:
    """The decoded image in RGB."""
    p = _check_exists(path, where)
    try:
        with Image.open(p) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: image {p} cannot be decoded ({e}); replace or remove it") from None


def image_grid(path: str, where: str, image_processor, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid the Qwen image processor produces for this image (header only)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = image_size(path, where)
    patch, merge = image_processor.patch_size, image_processor.merge_size
    try:
        h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise DataError(f"{where}: image {path} ({width}x{height}) cannot be used: {e}") from None
    return 1, h // patch, w // patch


def load_images(paths: list[str], where: str, image_processor, min_pixels: int, max_pixels: int):
    """(pixel_values [n_patches, C*T*P*P] float32, image_grid_thw [k, 3] long) of the images."""
    images = [open_rgb(p, where) for p in paths]
    out = image_processor(images=images, size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                          return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]
