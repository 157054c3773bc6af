import hashlib
import http.server
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from fruitlens.cli.main import main
from fruitlens.data.download import DatasetSource, download, fetch_dataset
from fruitlens.pipelines.demo import pick_classes
from fruitlens.errors import ConfigError, DownloadError
from conftest import make_tree, mobilenet_cached, need, shared_data


class RangeServer:
    """Serves one file with HTTP Range support; ``cut_once`` drops the first connection after that many bytes."""

    def __init__(self, payload: bytes, cut_once: int = 0, honour_range: bool = True):
        self.payload, self.cut, self.honour = payload, cut_once, honour_range
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng or "")
                start = int(rng.split("=")[1].split("-")[0]) if rng and outer.honour else 0
                body = outer.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut:
                    self.wfile.write(body[: outer.cut])
                    self.wfile.flush()
                    outer.cut = 0
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/data.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def smoke_zip(tmp_path) -> tuple[bytes, DatasetSource]:
    """A Fruits-360-like archive made here: Training/ and Test/ folders of 3 synthetic classes in a top folder."""
    tree = make_tree(
        tmp_path / "tree", per_class=8, classes=("apple", "kiwi", "lemon"), size=64, splits=("Training", "Test")
    )
    archive = tmp_path / "smoke.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(tree.rglob("*.jpg")):
            zf.write(f, Path("fruits-smoke-main") / f.relative_to(tree))
    data = archive.read_bytes()
    source = DatasetSource("smoke", "", hashlib.sha256(data).hexdigest(), 3, {"Training": 24, "Test": 24})
    return data, source


def test_download_checksum_pass_and_fail(tmp_path, smoke_zip):
    data, source = smoke_zip
    server = RangeServer(data)
    try:
        root = fetch_dataset(replace(source, url=server.url), cache=tmp_path / "cache")
        assert (root / "Training").is_dir() and (root / "Test").is_dir()
        with pytest.raises(DownloadError, match="does not match the expected"):
            download(server.url, tmp_path / "other" / "x.zip", sha256="0" * 64)
        assert (tmp_path / "other" / "x.zip.bad").exists() and not (tmp_path / "other" / "x.zip").exists()
    finally:
        server.close()


def test_another_address_never_reuses_the_first_ones_cache(tmp_path, smoke_zip):
    data, source = smoke_zip
    other_tree = make_tree(tmp_path / "t2", per_class=4, classes=("plum", "kiwi"), size=48, splits=("Training", "Test"))
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        for f in sorted(other_tree.rglob("*.jpg")):
            zf.write(f, Path("other-main") / f.relative_to(other_tree))
    first, second = RangeServer(data), RangeServer(other_zip.read_bytes())
    try:
        a = fetch_dataset(replace(source, url=first.url), cache=tmp_path / "cache")
        b = fetch_dataset(
            replace(source, url=second.url, sha256="", expected_counts={}, expected_classes=0), cache=tmp_path / "cache"
        )  # the same data set name, another --data-url
        assert a != b and sorted(p.name for p in (b / "Training").iterdir()) == ["kiwi", "plum"]
        assert second.requests  # it was downloaded, not taken from the first one's archive
    finally:
        first.close()
        second.close()


def test_interrupted_download_resumes_with_range(tmp_path, smoke_zip):
    data, source = smoke_zip
    server = RangeServer(data, cut_once=len(data) // 3)
    dest = tmp_path / "d.zip"
    try:
        with pytest.raises(DownloadError, match="run the same command again"):
            download(server.url, dest, sha256=source.sha256)
        part = dest.with_name("d.zip.part")
        assert part.stat().st_size == len(data) // 3
        seen = []
        download(server.url, dest, sha256=source.sha256, progress=lambda d, t: seen.append((d, t)))
        assert dest.read_bytes() == data and server.requests[-1] == f"bytes={len(data) // 3}-"
        assert seen[-1] == (len(data), len(data))
    finally:
        server.close()


def test_server_without_range_support_restarts_cleanly(tmp_path, smoke_zip):
    data, source = smoke_zip
    server = RangeServer(data, honour_range=False)
    dest = tmp_path / "d.zip"
    dest.with_name("d.zip.part").write_bytes(data[:100])
    try:
        download(server.url, dest, sha256=source.sha256)
        assert dest.read_bytes() == data
    finally:
        server.close()


def test_counts_that_do_not_match_are_reported(tmp_path, smoke_zip):
    data, source = smoke_zip
    server = RangeServer(data)
    try:
        with pytest.raises(DownloadError, match="does not match smoke"):
            fetch_dataset(
                replace(source, url=server.url, expected_counts={"Training": 25, "Test": 24}), cache=tmp_path / "cache"
            )
    finally:
        server.close()


def test_a_complete_part_file_is_taken_when_the_server_answers_416(tmp_path, smoke_zip):
    data, source = smoke_zip

    class Done(http.server.BaseHTTPRequestHandler):  # the resume request asks past the end: 416
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(416)
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Done)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    dest = tmp_path / "d.zip"
    dest.with_name("d.zip.part").write_bytes(data)
    try:
        download(f"http://127.0.0.1:{httpd.server_port}/d.zip", dest, sha256=source.sha256)
    finally:
        httpd.shutdown()
    assert dest.read_bytes() == data and not dest.with_name("d.zip.part").exists()


def test_archive_with_unsafe_paths_is_refused(tmp_path):
    from fruitlens.data.download import extract

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/Training/a/1.jpg", b"x")
        zf.writestr("../../escaped.txt", b"gotcha")
    with pytest.raises(DownloadError, match="unsafe path"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path.parent / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_local_archive_and_folder_sources(tmp_path, smoke_zip):
    data, source = smoke_zip
    archive = tmp_path / "local.zip"
    archive.write_bytes(data)
    root = fetch_dataset(replace(source, url=str(archive)), cache=tmp_path / "cache")
    assert (root / "Training" / "kiwi").is_dir() and len(list((root / "Test").rglob("*.jpg"))) == 24
    assert fetch_dataset(replace(source, url=str(root.parent), sha256=""), cache=tmp_path / "c2") == root  # in place
    with pytest.raises(DownloadError, match="no such archive or folder"):
        fetch_dataset(replace(source, url=str(tmp_path / "missing.zip")), cache=tmp_path / "c3")
    archive.write_bytes(data[:-10] + b"0123456789")
    before = archive.read_bytes()
    with pytest.raises(DownloadError, match="does not match the expected"):
        fetch_dataset(replace(source, url=str(archive)), cache=tmp_path / "c4")
    assert archive.read_bytes() == before  # the user's own archive is never moved or changed


def test_unreachable_host_says_what_to_do(tmp_path):
    with pytest.raises(DownloadError) as err:
        download("http://127.0.0.1:9/none.zip", tmp_path / "x.zip", timeout=2)
    assert "--data-url" in err.value.hint


def test_pick_classes():
    names = [f"c{i:02d}" for i in range(10)]
    assert pick_classes(names, "all") == names
    assert pick_classes(names, "5") == ["c00", "c02", "c04", "c06", "c08"]
    assert pick_classes(names, "c01, c03") == ["c01", "c03"]
    with pytest.raises(ConfigError, match="Did you mean 'c01'"):
        pick_classes(names, "c1,c03")


def test_demo_end_to_end_from_a_mirror_archive(tmp_path, smoke_zip, monkeypatch, capsys):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data, source = smoke_zip
    monkeypatch.setenv("FRUITLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("fruitlens.pipelines.demo.FRUITS360", replace(source, url="unused"))
    server = RangeServer(data)
    try:
        out = tmp_path / "demo"
        rc = main(
            [
                "demo",
                "--data-url",
                server.url,
                "--sha256",
                source.sha256,
                "--out",
                str(out),
                "--classes",
                "3",
                "--no-int8",
                "fit.fine_tune_epochs=1",
                "fit.epochs=5",
                "data.num_workers=0",
            ]
        )
    finally:
        server.close()
    assert rc == 0
    text = capsys.readouterr().out
    assert "fruitlens demo finished" in text and "leak-free" in text and "fruitlens serve" in text
    assert "(95% CI " in text  # the accuracy comes with how far it may be off
    for name in ("report.html", "export/model.onnx", "checkpoints/best.ckpt"):
        assert (out / name).exists()


def test_demo_on_real_fruits360_subset(tmp_path, capsys):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = shared_data("fruits360")
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--data",
                str(data),
                "--classes",
                "Kiwi,Lemon,Orange,Strawberry",
                "--out",
                str(out),
                "--no-int8",
                "fit.fine_tune_epochs=1",
                "fit.limit_batches=20",
                "fit.feature_views=1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "accuracy" in text and (out / "report.html").exists()
