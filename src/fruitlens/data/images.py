"""Decoding an image file the same way everywhere: EXIF upright, RGB, alpha composited on white."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fruitlens.errors import DataError


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white, 16-bit/float is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def shrink(img: Image.Image, min_side: int) -> Image.Image:
    """Scales ``img`` down so that its shorter side is ``min_side`` (no-op for small images or ``min_side`` 0)."""
    if min_side and min(img.size) > min_side:
        scale = min_side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img


def resize_crop(img: Image.Image, resize_size: int, image_size: int) -> Image.Image:
    """Shorter side to ``resize_size`` (bilinear), then a centred ``image_size`` square: pixel for pixel what
    torchvision's ``Resize(resize_size)`` + ``CenterCrop(image_size)`` give on a PIL image, without their dispatch
    cost (a test holds the two equal)."""
    w, h = img.size
    if resize_size < image_size:
        raise ValueError(f"resize_crop needs resize_size >= image_size, got {resize_size} < {image_size}")
    if w <= h:
        nw, nh = resize_size, int(resize_size * h / w)
    else:
        nw, nh = int(resize_size * w / h), resize_size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    if (nw, nh) == (image_size, image_size):
        return img
    top, left = int(round((nh - image_size) / 2.0)), int(round((nw - image_size) / 2.0))
    return img.crop((left, top, left + image_size, top + image_size))


def load_image(path: str | Path, min_side: int = 0) -> Image.Image:
    """Opens, fully decodes, turns upright and converts to RGB; raises DataError naming the file.

    ``min_side`` > 0 shrinks big images so that their shorter side is about ``min_side`` (JPEGs decode at a reduced
    scale, which makes large phone photos several times faster to load).
    """
    try:
        with Image.open(path) as img:
            if min_side:
                img.draft("RGB", (min_side, min_side))
            img.load()
            img = to_rgb(ImageOps.exif_transpose(img))
        return shrink(img, min_side)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})",
                        "run 'fruitlens check' on the data to list every bad file") from None
