"""Where the model looked: the class activation map of a prediction, drawn over the photo.

The map comes from the model itself (``FruitNet.class_maps``: the head's weights for the class over the last feature
map, exact for this head and free of gradients); the ONNX export outputs it too, so that the service draws it
without PyTorch. The overlay covers the region the model saw (the centre crop) at the photo's own size.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from fruitlens.models.preprocessing import ImageSource, Preprocessing, crop_box, decode

MAX_SIDE = 1024  # overlays of bigger photos are drawn at this longer side
ALPHA = 0.5


def _colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 with matplotlib's 'inferno' (perceptually even, readable in grey)."""
    from matplotlib import colormaps

    return (colormaps["inferno"](values)[..., :3] * 255).astype(np.uint8)


def normalised_map(cam: np.ndarray) -> np.ndarray:
    """A class map (h, w) -> [0, 1]: the positive evidence for the class, relative to its strongest spot."""
    cam = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    top = float(cam.max())
    return cam / top if top > 0 else cam


def overlay(photo: Image.Image, cam: np.ndarray, pre: Preprocessing, caption: str = "") -> Image.Image:
    """``photo`` (upright RGB) with ``cam`` (the class map of the model's input) over the region the model saw;
    the rest is dimmed. The result has the photo's size (at most ``MAX_SIDE`` on its longer side)."""
    photo = photo.convert("RGB")
    if max(photo.size) > MAX_SIDE:
        scale = MAX_SIDE / max(photo.size)
        photo = photo.resize(
            (max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.Resampling.BILINEAR
        )
    left, top, right, bottom = (round(v) for v in crop_box(photo.width, photo.height, pre.resize_size, pre.image_size))
    base = np.asarray(photo, dtype=np.float32)
    out = base * 0.45  # outside the model's view
    w, h = max(1, right - left), max(1, bottom - top)
    heat = Image.fromarray((normalised_map(cam) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    colour = _colormap(np.asarray(heat, dtype=np.float32) / 255).astype(np.float32)
    region = base[top : top + h, left : left + w]
    out[top : top + h, left : left + w] = (1 - ALPHA) * region + ALPHA * colour[: region.shape[0], : region.shape[1]]
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if caption:
        draw = ImageDraw.Draw(img)
        box = draw.textbbox((0, 0), caption)
        draw.rectangle((0, 0, box[2] + 8, box[3] + 6), fill=(0, 0, 0))
        draw.text((4, 2), caption, fill=(255, 255, 255))
    return img


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def explain(source: ImageSource, prediction, pre: Preprocessing, max_pixels: int | None = None) -> Image.Image:
    """The overlay of a Prediction (which carries its class map) on the image it was made for, captioned."""
    if prediction.class_map is None:
        raise ValueError("this model gives no class activation maps (export it again with 'fruitlens export RUN')")
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    photo = decode(source, min_side=MAX_SIDE, **kwargs).image
    return overlay(photo, prediction.class_map, pre, prediction.text())
