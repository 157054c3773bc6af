"""Data sets fetched on first use: resumable download, checksum, extraction, and a check against published counts."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fruitlens.data.scan import is_image_file
from fruitlens.errors import DownloadError
from fruitlens.filehash import sha256_file

log = logging.getLogger(__name__)

FRUITS360_COMMIT = "019ab6f4eec0f6b9bdae4efe8ee55f377bef8812"


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set comes from and what its extracted tree must hold."""

    name: str
    url: str
    sha256: str = ""  # known for mirrors; GitHub's generated archives have none published
    expected_classes: int = 0
    expected_counts: dict[str, int] = field(default_factory=dict)  # split folder -> images
    version: str = ""


FRUITS360 = DatasetSource(
    name="fruits-360-100x100",
    url=f"https://github.com/fruits-360/fruits-360-100x100/archive/{FRUITS360_COMMIT}.zip",
    expected_classes=155,
    expected_counts={"Training": 76893, "Test": 25746},
    version="2025.03.09.0",
)
REGISTERED = {FRUITS360.name: FRUITS360.url}  # name -> address whose cache keeps the plain name


def cache_root() -> Path:
    """``$FRUITLENS_CACHE`` or ``~/.cache/fruitlens``."""
    return Path(os.environ.get("FRUITLENS_CACHE") or Path.home() / ".cache" / "fruitlens")


Progress = Callable[[int, int], None]  # (bytes so far, total or 0)


def download(
    url: str,
    dest: Path,
    *,
    sha256: str = "",
    progress: Progress | None = None,
    timeout: float = 60,
    chunk: int = 1 << 20,
) -> Path:
    """Downloads ``url`` to ``dest``, resuming a ``dest.part`` left by an interrupted run (HTTP Range).

    Verifies ``sha256`` when given; a mismatch removes the bad download and raises DownloadError.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        _verify(dest, sha256)
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(
        url, headers={"User-Agent": "fruitlens", **({"Range": f"bytes={have}-"} if have else {})}
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already complete
            part.replace(dest)
            _verify(dest, sha256)
            return dest
        raise DownloadError(
            f"{url}: HTTP {exc.code} {exc.reason}", "check the URL or use --data-url for a mirror"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(
            f"cannot download {url} ({getattr(exc, 'reason', exc)})",
            "check the network, set FRUITLENS_DATA_URL / --data-url to a mirror or a local archive, "
            "or pass --data FOLDER",
        ) from None
    with resp:
        resumed = resp.status == 206
        if have and not resumed:
            log.info("server ignored the resume request: starting %s again", dest.name)
            have = 0
        elif resumed:
            log.info("resuming %s at %.1f MB", dest.name, have / 2**20)
        total = int(resp.headers.get("Content-Length") or 0) + have
        done = have
        with part.open("ab" if resumed else "wb") as fh:
            try:
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    fh.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            except (OSError, TimeoutError) as exc:
                raise DownloadError(
                    f"download of {url} broke off at {done / 2**20:.1f} MB ({exc})",
                    "run the same command again: it resumes where it stopped",
                ) from None
    if total and done < total:
        raise DownloadError(
            f"download of {url} stopped at {done} of {total} bytes",
            "run the same command again: it resumes where it stopped",
        )
    part.replace(dest)
    _verify(dest, sha256)
    return dest


def _verify(path: Path, sha256: str, ours: bool = True) -> None:
    """Checks the file's SHA-256; a bad download of ours is moved aside, a user's own archive is left as it is."""
    if not sha256:
        return
    digest = sha256_file(path)
    if digest != sha256.lower():
        where = ""
        if ours:
            bad = path.with_name(path.name + ".bad")
            path.replace(bad)
            where = f" (moved aside as {bad.name})"
        raise DownloadError(
            f"{path.name}: SHA-256 {digest[:16]}... does not match the expected {sha256[:16]}...{where}",
            "download again, or check the mirror's checksum",
        )


def extract(archive: Path, dest: Path) -> Path:
    """Extracts a zip or tar archive into ``dest`` (atomically: a half extraction never counts as done)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise DownloadError(f"{archive}: unsafe path {member} in the archive")
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        else:
            raise DownloadError(f"{archive}: not a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DownloadError(f"{archive}: broken archive ({exc})", f"delete {archive} and download again") from None
    tmp.replace(dest)
    return dest


def find_data_root(folder: Path) -> Path:
    """The folder inside an extracted archive that holds the split (or class) folders."""
    from fruitlens.data.manifest import split_alias

    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if any(split_alias(c.name) for c in path.iterdir() if c.is_dir()):
            return path
    return folder


def verify_counts(root: Path, source: DatasetSource) -> dict[str, int]:
    """Counts images per split folder and classes; raises DownloadError when they differ from the published ones."""
    counts, classes = {}, set()
    for split in source.expected_counts:
        folder = root / split
        if not folder.is_dir():
            raise DownloadError(
                f"{root}: the extracted data lacks the folder {split}",
                "the archive is not the expected data set; delete the cache folder and retry",
            )
        n = 0
        for cls in folder.iterdir():
            if cls.is_dir():
                classes.add(cls.name)
                n += sum(1 for f in cls.iterdir() if is_image_file(f))
        counts[split] = n
    mismatch = {s: (counts[s], e) for s, e in source.expected_counts.items() if counts[s] != e}
    if mismatch or (source.expected_classes and len(classes) != source.expected_classes):
        what = ", ".join(f"{s}: {got} images, expected {exp}" for s, (got, exp) in mismatch.items())
        if source.expected_classes and len(classes) != source.expected_classes:
            what += f"{', ' if what else ''}{len(classes)} classes, expected {source.expected_classes}"
        raise DownloadError(
            f"{root}: the extracted data does not match {source.name} {source.version} ({what})",
            "delete the folder and download again, or pass --data FOLDER to use your own copy",
        )
    return counts


def _cache_name(source: DatasetSource) -> str:
    """The cache's name for ``source``: its own name for the registered address, else that name and a hash of the
    address, so that another --data-url never reuses the first one's archive or extracted tree."""
    if REGISTERED.get(source.name) == source.url or "://" not in source.url:
        return source.name
    return f"{source.name}-{hashlib.sha1(source.url.encode()).hexdigest()[:10]}"


def fetch_dataset(source: DatasetSource, *, cache: Path | None = None, progress: Progress | None = None) -> Path:
    """Returns the data root of ``source``: downloaded, verified and extracted into the cache on first use.

    ``source.url`` may be http(s), a local archive, or a local folder (used in place).
    """
    cache = cache or cache_root() / "datasets"
    url = source.url
    local = Path(url[7:] if url.startswith("file://") else url)
    if "://" not in url or url.startswith("file://"):
        if local.is_dir():
            root = find_data_root(local)
            if source.expected_counts:
                verify_counts(root, source)
            return root
        if not local.is_file():
            raise DownloadError(f"{url}: no such archive or folder")
        archive = local
        _verify(archive, source.sha256, ours=False)
    else:
        archive = download(url, cache / f"{_cache_name(source)}.zip", sha256=source.sha256, progress=progress)
    folder = cache / _cache_name(source)
    done = folder / ".verified"
    extracted = extract(archive, folder)
    root = find_data_root(extracted)
    if not done.exists():
        t0 = time.perf_counter()
        counts = verify_counts(root, source) if source.expected_counts else {}
        done.write_text(f"{counts}\n")
        log.info("verified %s in %.1fs: %s", root, time.perf_counter() - t0, counts)
    return root
