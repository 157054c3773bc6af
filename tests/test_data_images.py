import numpy as np
import pytest
import torch
from PIL import Image

from fruitlens.config import AugmentConfig
from fruitlens.data.dataset import ImageDataset
from fruitlens.data.scan import scan
from fruitlens.errors import ImageError
from fruitlens.models.preprocessing import Preprocessing, decode, resize_crop, to_rgb
from fruitlens.training.augment import BatchInput, augment_batch


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert to_rgb(img).getpixel((0, 0)) == (255, 0, 0)
    half = Image.new("RGBA", (4, 4), (0, 0, 255, 128))
    r, g, b = to_rgb(half).getpixel((0, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255  # half-transparent blue over white


def test_16_bit_is_scaled_by_its_depth_not_stretched(tmp_path):
    # a 16-bit copy of a photo (each value x 257) must read as the photo: the same pixels, so the same answer
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 2 + 40  # 40 .. 166: not the full range
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    eight, sixteen = (np.asarray(to_rgb(Image.open(tmp_path / f"{n}.png"))) for n in ("eight", "sixteen"))
    assert sixteen.shape == (8, 8, 3) and np.array_equal(eight, sixteen)
    ramp = np.asarray(to_rgb(Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)))
    assert ramp[0, 0].tolist() == [0, 0, 0] and ramp[3, 3, 0] == round(60000 / 257)


def test_arrays_are_read_by_their_dtype_convention():
    pre = Preprocessing(32, 32, (0.5,) * 3, (0.25,) * 3)
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    want = pre.pixels(img)
    assert np.array_equal(pre.pixels(img.astype(np.float32) / 255), want)  # floats in 0-1 (torchvision, matplotlib)
    assert np.array_equal(pre.pixels(img.astype(np.float64)), want)  # floats in 0-255
    sixteen = np.minimum(img.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16)  # not a multiple of 257
    assert np.array_equal(pre.pixels(sixteen), want)  # 16-bit, scaled (not wrapped to its low 8 bits)
    with pytest.raises(ImageError, match="pixel values from -1 to 1"):
        pre.pixels(img.astype(np.float32) / 127.5 - 1)  # a normalised tensor is not an image


def test_palette_and_cmyk_keep_their_colours():
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    pal.putpixel((1, 1), 1)
    got = to_rgb(pal)
    assert got.getpixel((1, 1)) == (200, 30, 40) and got.getpixel((0, 0)) == (0, 0, 0)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("orientation, corner", [(6, (0, 0)), (8, (19, 39))])
def test_exif_rotation_turns_the_image_the_right_way(tmp_path, orientation, corner):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 8))  # a white square at the top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 clockwise to view, 8: 90 counter-clockwise
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    d = decode(tmp_path / "r.jpg")
    assert d.image.size == (20, 40) and d.exif_rotated and (d.width, d.height) == (40, 20)
    # orientation 6: the stored top-left ends up at the top right; 8: at the bottom left
    want = (19, 0) if orientation == 6 else (0, 39)
    assert min(d.image.getpixel(want)) > 200 and max(d.image.getpixel(corner if orientation == 8 else (0, 39))) < 60


def test_shapes_no_photo_has_are_refused_before_decoding(tmp_path):
    for size, what in (
        ((1, 20000), "too small"),
        ((12, 2000), "aspect ratio"),
        ((4, 4), "too small"),
        ((300, 20), "aspect ratio"),
    ):
        Image.new("RGB", size, "red").save(tmp_path / "x.png")
        with pytest.raises(ImageError, match=what) as err:
            decode(tmp_path / "x.png")
        assert err.value.reason == "bad-shape" and "x.png" in err.value.message
    Image.new("RGB", (1000, 1000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="exceeds the limit of 999,999 pixels") as err:
        decode(tmp_path / "big.png", max_pixels=999_999)
    assert err.value.reason == "too-many-pixels"
    for data, reason in ((b"", "empty"), (b"<html>not a jpeg</html>", "not-an-image")):
        with pytest.raises(ImageError) as err:
            decode(data)
        assert err.value.reason == reason


def test_wide_but_legal_image_costs_only_its_crop():
    pre = Preprocessing(96, 96)
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 990, 3), dtype=np.uint8))  # 9.9:1
    assert pre.crop(strip).shape == (96, 96, 3)


def test_normalise_uint8_and_float_agree():
    pre = Preprocessing(32, 36, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1))
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    want = (x.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    assert torch.allclose(pre.normalise(x), want, atol=1e-5)
    assert torch.allclose(pre.normalise(x.float() / 255), want, atol=1e-5)
    assert np.allclose(pre.inputs(x.permute(0, 2, 3, 1).numpy()), want.numpy(), atol=1e-5)


def test_batch_input_follows_preprocessing_and_switches():
    pre = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    img = Image.new("RGB", (80, 60), (255, 255, 255))
    u8 = torch.from_numpy(pre.crop(img)).permute(2, 0, 1)[None]
    x = pre.normalise(u8)[0]
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0))
    off = BatchInput(pre, AugmentConfig(enabled=False))
    assert torch.allclose(off(u8, train=True)[0], x) and torch.allclose(
        BatchInput(pre, AugmentConfig())(u8, False)[0], x
    )
    aug = BatchInput(pre, AugmentConfig(color_jitter=0.4))(u8.repeat(4, 1, 1, 1), train=True)
    assert aug.shape == (4, 3, 32, 32) and not torch.allclose(aug[0], aug[1])


@pytest.mark.parametrize("path", ["images", "features"])
def test_colour_jitter_keeps_the_hue(path):
    """Brightness, contrast and saturation vary; hue does not (a yellow-green apple must not turn into a green one).
    Both training paths: images (fine-tuning, --no-feature-cache) and the feature cache's augmented views."""
    aug = AugmentConfig(rotation=0, zoom=0, shift=0, hflip=False, random_crop=False, color_jitter=0.4)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    img = Image.new("RGB", (32, 32), (200, 60, 60))  # red: G == B, and stays so unless the hue turns
    pre = Preprocessing(32, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    images = BatchInput(pre, aug, seed=0)
    for _ in range(20):
        x = images(u8, train=True)[0] if path == "images" else augment_batch(u8, aug, g)[0]
        r, gr, b = x.mean((1, 2)).tolist()
        assert abs(gr - b) < 2 / 255 and r >= gr, (r, gr, b)


def test_batched_augmentation_differs_per_image_and_fills_white():
    x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    out = augment_batch(
        x, AugmentConfig(rotation=30, zoom=0.2, shift=0.2, color_jitter=0), torch.Generator().manual_seed(0)
    )
    assert out.shape == (8, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert out.max() > 0.9  # white came in at the borders
    assert not torch.equal(out[0], out[1])


def test_random_resized_crop_zooms_into_a_region_inside_the_image():
    """Crops of 25-100% of the area (aspect 3:4..4:3), shown at full size, never reach past the image's edges."""
    x = torch.zeros(64, 3, 64, 64, dtype=torch.uint8)
    x[:, 0] = torch.linspace(0, 200, 64).round().to(torch.uint8)  # red = x position, never white
    aug = AugmentConfig(rotation=0, zoom=0, shift=0, hflip=False, color_jitter=0, crop_scale=0.25)
    out = augment_batch(x, aug, torch.Generator().manual_seed(0))[:, 0] * 255
    width = (out[:, :, -1] - out[:, :, 0]).mean(1) / 200  # the share of the image's width that each crop spans
    assert width.min() >= (0.25 * 3 / 4) ** 0.5 - 0.03 and width.max() <= 1.0 + 1e-4
    assert width.min() < 0.7 and (width > 0.9).any()  # small and large crops both occur
    assert out.min() >= -1e-3 and out.max() <= 200 + 1e-3  # no white from outside the image


def test_dataset_skips_a_file_that_broke_after_the_check(fruit_tree, caplog):
    m = scan(fruit_tree).manifest
    victim = m.resolve(m.records[0])
    victim.write_bytes(b"broken")
    ds = ImageDataset(m, m.classes, Preprocessing(32, 32))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert str(victim) in ds.skipped and "skipping" in caplog.text


def test_resize_crop_matches_torchvision_resize_and_centre_crop():
    """Within one grey level of torchvision's Resize + CenterCrop (it resamples only the crop's region)."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    for (w, h), (resize, crop) in [
        ((100, 100), (96, 96)),
        ((57, 41), (96, 96)),
        ((641, 480), (256, 224)),
        ((333, 500), (256, 224)),
        ((96, 96), (96, 96)),
        ((97, 301), (110, 96)),
        ((1000, 999), (448, 448)),
    ]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = np.asarray(v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])(img)).astype(int)
        got = resize_crop(img, resize, crop)
        assert got.shape == (crop, crop, 3) and np.abs(got.astype(int) - want).max() <= 1, (w, h, resize, crop)


def test_colour_jitter_matrix_equals_brightness_contrast_saturation_in_turn():
    aug = AugmentConfig(rotation=0, zoom=0, shift=0, hflip=False, random_crop=False, color_jitter=0.4)
    x = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    got = augment_batch(x, aug, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # the (here identity) warp's draws: angle, zoom, shift x, shift y
        torch.rand(6, generator=g)
    b, c, s = (0.6 + 0.8 * torch.rand(6, generator=g) for _ in range(3))
    img, shape = x.float() / 255, (6, 1, 1, 1)
    img = img * b.view(shape)  # brightness
    gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    img = (img - mean) * c.view(shape) + mean  # contrast
    gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
    img = (img - gray) * s.view(shape) + gray  # saturation
    assert torch.allclose(got, img.clamp(0, 1), atol=1e-5)
