"""Shared fixtures: synthetic images made here, real data from ../shared/data when present, one small trained run."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# fruitlens's own cache (downloads, the feature store) lives in a folder of this test session, not in ~/.cache
os.environ["FRUITLENS_CACHE"] = __import__("tempfile").mkdtemp(prefix="fruitlens-test-cache-")
# Every wall-clock deadline in the tests (server start, browser waits, subprocesses) is a safety net against a hang,
# never a speed target: generous enough that a slow, loaded machine does not trip it. Speed is measured in benchmarks/.
HANG = 600

COLOURS = {"apple": (200, 30, 30), "kiwi": (90, 140, 40), "lemon": (240, 220, 40), "plum": (90, 40, 120)}


def need(condition: bool, reason: str) -> None:
    """Skip with a visible reason on a user's machine; under CI=true the prerequisite must be there."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    need(path.is_dir(), f"{path} is absent (real-image tests read ../shared/data)")
    return path


def fruit_image(label: str, seed: int, size: int = 64) -> Image.Image:
    """A fruit-ish blob of the class colour at a random place and size on white, with noise: learnable, not
    identical."""
    rng = random.Random(f"{label}-{seed}")
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    colour = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[label])
    shape = d.ellipse if label in ("apple", "plum") else d.rectangle
    shape([cx - r, cy - r, cx + r, cy + r], fill=colour)
    arr = np.asarray(img).astype(np.int16)
    arr += np.random.default_rng(rng.randint(0, 10**6)).integers(-12, 13, arr.shape, dtype=np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_tree(
    root: Path, per_class: int = 12, classes=("apple", "kiwi", "lemon"), size: int = 64, splits: tuple[str, ...] = ()
) -> Path:
    """DATA/<class>/<n>.jpg, or DATA/<split>/<class>/<n>.jpg for each of ``splits``."""
    for s_i, split in enumerate(splits or ("",)):
        for label in classes:
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                fruit_image(label, 1000 * s_i + i, size).save(folder / f"{label}_{i:03d}.jpg", quality=92)
    return root


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def tree_state(root: Path) -> dict[str, tuple[int, float]]:
    """(size, mtime) of every file: equal before and after means nothing was touched."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fruit_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "fruit")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A small_cnn run trained for three epochs on synthetic images; shared by predict/export/serve/evaluate tests,
    which only read it (a test that writes into a run takes ``run_copy``)."""
    from fruitlens.config import TrainConfig, apply_overrides
    from fruitlens.pipelines.train import train

    base = tmp_path_factory.mktemp("trained")
    data = make_tree(base / "data", per_class=16, classes=("apple", "kiwi", "lemon", "plum"), size=48)
    cfg = apply_overrides(
        TrainConfig(),
        {
            "data.path": str(data),
            "model.name": "small_cnn",
            "model.img_size": 32,
            "fit.epochs": 3,
            "fit.batch_size": 16,
            "data.num_workers": 0,
            "fit.target_acc": 0,
            "data.group": "none",
        },
    )
    return train(cfg.validated(), base / "run").run.path


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, for tests that evaluate, export or otherwise write into it."""
    import shutil

    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``: equal before and after means no file was changed, added or removed."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def mobilenet_cached() -> bool:
    from fruitlens.models.weights import is_cached
    from torchvision.models import MobileNet_V2_Weights

    return any(is_cached(w) for w in MobileNet_V2_Weights)


def train_small(tmp_path: Path, name: str, epochs: int = 3, **options):
    """``fruitlens.train`` of a small_cnn for a few epochs on synthetic images in ``tmp_path/data`` (made once)."""
    import fruitlens

    data = tmp_path / "data"
    if not data.exists():
        make_tree(data, per_class=12, size=48)
    return fruitlens.train(
        data,
        tmp_path / name,
        model="small_cnn",
        img_size=32,
        epochs=epochs,
        batch_size=16,
        workers=0,
        target_acc=0,
        group="none",
        **options,
    )


def chromium(tmp_path: Path, downloads: Path | None = None, size: str = "900,800"):
    """Headless Debian Chromium driven by Selenium (skips with a reason where it is not installed; under CI=true it
    must be there). ``downloads``: where the browser saves the files a page hands it."""
    import shutil

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    need(
        bool(binary and driver),
        "Debian chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={size}",
    ):
        opts.add_argument(arg)
    if downloads is not None:
        opts.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    if downloads is not None:
        browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return browser
