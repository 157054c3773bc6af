"""How an image file becomes the model's input: decode, geometry, normalisation. The one implementation.

Training (its uint8 datasets and batched augmentation), the Predictor (predict, evaluate, serve), the export parity
check and ``check`` all call these functions, so that a served request takes the path that training and the parity
check took. ``Preprocessing`` is made by the model builder, saved in the run and in the exported model's metadata.

- decode: bytes, a path, a PIL image or an array -> upright 8-bit RGB (EXIF orientation applied, alpha composited on
  white, 16-bit rescaled), big JPEGs decoded at a reduced scale (draft); images no photo has (fewer pixels than
  ``MIN_SIDE`` a side, an aspect ratio beyond ``MAX_ASPECT``, more than ``max_pixels``) are refused with an
  ``ImageError`` that says which limit.
- geometry: shorter side to ``resize_size`` (bilinear), centred ``image_size`` square. Only the crop's source region
  is resampled, so the work and memory are bounded by the output size whatever the input's shape.
- normalisation: ``(x / 255 - mean) / std`` as one multiply and one subtract on whole batches.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fruitlens.errors import ImageError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MIN_SIDE = 8  # px: below this there is nothing to recognise (``check --min-size`` sets the bar for training data)
MAX_ASPECT = 10.0  # longer side / shorter side: beyond this it is a strip, not a photo
DEFAULT_MAX_PIXELS = 100_000_000  # a 100-megapixel photo; the service sets a lower limit of its own
DECODE_MARGIN = 1.25  # images are decoded with their shorter side at least this times resize_size

ImageSource = Union[str, Path, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, centre-crop ``image_size``, scale to [0, 1], normalise."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            int(d["image_size"]), int(d["resize_size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"]))
        )

    def with_image_size(self, size: int) -> "Preprocessing":
        """Same normalisation at another input size; the resize keeps the whole image (minimal crop)."""
        return Preprocessing(size, size, self.mean, self.std)

    @property
    def decode_side(self) -> int:
        """Shorter side images are decoded at: far below a phone photo's, a little above the resize."""
        return int(self.resize_size * DECODE_MARGIN)

    def load(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decodes ``source`` at this preprocessing's decode size (see ``decode``)."""
        return decode(source, min_side=self.decode_side, max_pixels=max_pixels).image

    def crop(self, img: Image.Image) -> np.ndarray:
        """The geometry: a decoded image -> ``image_size`` x ``image_size`` x 3 uint8 array."""
        return resize_crop(img, self.resize_size, self.image_size)

    def pixels(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode + geometry: ``source`` -> HxWx3 uint8, what every path feeds to ``normalise``."""
        return self.crop(self.load(source, max_pixels))

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float32 ``(scale, shift)`` with ``uint8 * scale - shift == (x / 255 - mean) / std``."""
        std = np.asarray(self.std, dtype=np.float32)
        return 1.0 / (255.0 * std), np.asarray(self.mean, dtype=np.float32) / std

    def normalise(self, x: "torch.Tensor") -> "torch.Tensor":
        """(N, 3, H, W) uint8 in 0..255, or float in [0, 1] (augmented views) -> the model's normalised float input.

        Two passes over the pixels and no temporaries (float input is normalised in place)."""
        import torch  # here: decoding (check, serve) does not need it

        scale, shift = (torch.from_numpy(v).to(x.device).view(1, 3, 1, 1) for v in self.scale_shift())
        if x.dtype == torch.uint8:
            return torch.mul(x, scale).sub_(shift)
        return x.mul_(scale * 255.0).sub_(shift)

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        """A stack of ``pixels`` results, (n, H, W, 3) uint8 -> normalised (n, 3, H, W) float32 (for ONNX Runtime)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()
        return self.normalise(x).numpy()


def batch_for(image_size: int, base: int = 32, least: int = 8) -> int:
    """Images per batch at ``image_size``: ``base`` at 96 px, fewer as the pixels grow (activations stay about the
    same size: 8 at 448 px), at least ``least``."""
    return max(least, min(base, int(base * (96 / image_size) ** 2)))


@dataclass(frozen=True)
class Decoded:
    """A decoded image and what its file said: size and mode as stored, whether EXIF turned it."""

    image: Image.Image  # upright 8-bit RGB
    width: int
    height: int
    mode: str
    exif_rotated: bool


def decode(source: ImageSource, *, min_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decodes an image file (path or bytes), a PIL image or an HxW(x3|4) array into upright RGB.

    ``min_side`` > 0 shrinks big images so that their shorter side is about ``min_side`` (JPEGs decode at a reduced
    scale, which makes phone photos several times faster to load). Raises ``ImageError`` naming the source.
    """
    name = _name(source)
    if isinstance(source, np.ndarray):
        source = _from_array(source, name)
    if isinstance(source, Image.Image):
        _check_shape(source.width, source.height, max_pixels, name)
        rgb = to_rgb(ImageOps.exif_transpose(source))
        return Decoded(shrink(rgb, min_side), source.width, source.height, source.mode, False)
    data = _read(source, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with Image.open(io.BytesIO(data)) as img:
                width, height, mode = img.width, img.height, img.mode
                _check_shape(width, height, max_pixels, name)
                orientation = img.getexif().get(0x0112, 1)
                if min_side:
                    img.draft("RGB", (min_side, min_side))
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image (expected JPEG, PNG, WebP, BMP, GIF or TIFF)",
            "run 'fruitlens check' on the data to list every bad file",
            "not-an-image",
        ) from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: too many pixels (decompression bomb guard)", None, "too-many-pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(
            f"{name}: cannot decode image ({exc})", "run 'fruitlens check' on the data to list every bad file"
        ) from None
    return Decoded(shrink(rgb, min_side), width, height, mode, orientation not in (None, 0, 1))


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return {bytes: "image bytes", np.ndarray: "image array"}.get(type(source), "image")


def _read(source: ImageSource, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: file not found", None, "missing") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot read file ({exc.strerror or exc})", None, "missing") from None
    else:
        raise ImageError(
            f"expected a path, bytes, PIL image or array but received {type(source).__name__}", None, "not-an-image"
        )
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes)", None, "empty")
    return data


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"{name}: expected an HxWx3 image array but received shape {arr.shape}", None, "bad-shape")
    return Image.fromarray(_to_uint8(arr, name))


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """Pixel values as 8 bits by the array's own convention: floats in 0-1 (as torchvision and matplotlib give
    them) or 0-255, 16-bit integers over 0-65535, 8-bit as they are. Anything else is refused, not wrapped around."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr.astype(np.float32) / 257).round().astype(np.uint8)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0 and hi <= 1:
        return (arr * 255).round().astype(np.uint8)
    if lo < 0 or hi > 255 or not np.isfinite([lo, hi]).all():
        raise ImageError(
            f"{name}: pixel values from {lo:g} to {hi:g} ({arr.dtype}); expected 0-255, or 0-1 for floats",
            "pass uint8 pixels (e.g. np.asarray(PIL.Image.open(path).convert('RGB')))",
            "bad-shape",
        )
    return arr.round().astype(np.uint8) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.uint8)


def _check_shape(width: int, height: int, max_pixels: int, name: str) -> None:
    """Refuses sizes no photo has, before any pixel is decoded (the header tells the size)."""
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} pixels exceeds the limit of {max_pixels:,} pixels", None, "too-many-pixels"
        )
    short, long = min(width, height), max(width, height)
    if short < MIN_SIDE:
        raise ImageError(
            f"{name}: {width}x{height} px is too small to classify (at least {MIN_SIDE} px a side)", None, "bad-shape"
        )
    if long > MAX_ASPECT * short:
        raise ImageError(
            f"{name}: {width}x{height} px has an aspect ratio of {long / short:.0f}:1, beyond the "
            f"{MAX_ASPECT:g}:1 a photo has",
            "crop it to the fruit first",
            "bad-shape",
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white, 16-bit/float is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # by the depth, not the image's own range: a 16-bit copy of a photo must read as the photo, not stretched
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16") or 255 < hi <= 65535:
            arr = arr / 257
        elif img.mode == "F" and hi <= 1:
            arr = arr * 255
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
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
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=2.0,
        )
    return img


def crop_box(width: int, height: int, resize_size: int, image_size: int) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of a ``width`` x ``height`` image that the geometry keeps: what
    resizing the shorter side to ``resize_size`` and cropping the centred ``image_size`` square shows."""
    if resize_size < image_size:
        raise ValueError(f"resize_crop needs resize_size >= image_size, got {resize_size} < {image_size}")
    nw, nh = (
        (resize_size, int(resize_size * height / width))
        if width <= height
        else (int(resize_size * width / height), resize_size)
    )
    top, left = int(round((nh - image_size) / 2.0)), int(round((nw - image_size) / 2.0))
    sx, sy = width / nw, height / nh
    return left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy


def resize_crop(img: Image.Image, resize_size: int, image_size: int) -> np.ndarray:
    """Shorter side to ``resize_size`` (bilinear), then the centred ``image_size`` square, as uint8 HxWx3.

    The same result as torchvision's ``Resize(resize_size)`` + ``CenterCrop(image_size)`` within one grey level (a
    test holds them so), but only the crop's source region is resampled: a 1x20000 strip costs what a square does.
    """
    box = crop_box(img.width, img.height, resize_size, image_size)
    if img.size == (image_size, image_size) and box == (0, 0, image_size, image_size):
        return np.array(img, dtype=np.uint8)
    return np.array(img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
