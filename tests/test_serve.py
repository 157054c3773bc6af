import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fruitlens.inference.predictor import Predictor
from fruitlens.serve.app import create_app
from fruitlens.serve.deps import get_predictor
from fruitlens.serve.settings import ServeSettings
from conftest import HANG, ROOT, chromium, fruit_image, jpeg_bytes


@pytest.fixture(scope="module")
def client(trained_run):
    app = create_app(ServeSettings(str(trained_run), max_upload_mb=1))
    with TestClient(app) as c:
        yield c


def test_health_labels_page_and_docs(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] and h["classes"] == 4
    assert client.get("/labels").json() == {"labels": ["apple", "kiwi", "lemon", "plum"]}
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text and "textContent" in page.text
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    import re

    docs = client.get("/docs").text  # the API docs work offline: their scripts come from the service itself
    scripts = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs)
    assert scripts and not [u for u in scripts if u.startswith(("http:", "https:", "//"))]
    assert all(client.get(u).status_code == 200 for u in scripts)


def test_predict_multipart_matches_predictor(client, trained_run):
    img = fruit_image("lemon", 5, 48)
    data = jpeg_bytes(img, quality=95)
    r = client.post("/predict?top_k=2", files={"file": ("l.jpg", data, "image/jpeg")})
    assert r.status_code == 200
    body = r.json()
    assert body["filename"] == "l.jpg" and len(body["top_k"]) == 2
    expected = Predictor.load(trained_run).predict([Image.open(io.BytesIO(data))])[0]
    assert body["label"] == expected.label and abs(body["score"] - expected.score) < 1e-3


def test_predict_several_files_and_base64_json(client):
    a, b = jpeg_bytes(fruit_image("apple", 1, 48)), jpeg_bytes(fruit_image("kiwi", 2, 48))
    r = client.post("/predict", files=[("files", ("a.jpg", a, "image/jpeg")), ("files", ("b.jpg", b, "image/jpeg"))])
    assert [p["filename"] for p in r.json()["predictions"]] == ["a.jpg", "b.jpg"]
    r = client.post("/predict", json={"image": base64.b64encode(a).decode()})
    assert r.status_code == 200 and "label" in r.json()
    r = client.post(
        "/predict",
        json={"images": [base64.b64encode(a).decode(), "data:image/jpeg;base64," + base64.b64encode(b).decode()]},
    )
    assert len(r.json()["predictions"]) == 2


def test_errors_and_limits(client):
    r = client.post("/predict", files={"file": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    good = jpeg_bytes(fruit_image("apple", 1, 64))
    r = client.post("/predict", files={"file": ("t.jpg", good[: len(good) // 2], "image/jpeg")})
    assert r.status_code == 422 and "cannot decode" in r.json()["detail"]
    big = b"\xff" * (2 * 2**20)
    r = client.post("/predict", files={"file": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413
    r = client.post("/predict", json={"image": "!!!not base64"})
    assert r.status_code == 422
    r = client.post("/predict", content=b"raw", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415
    r = client.post("/predict", files={"other": ("", b"", "text/plain")}, data={"x": "1"})
    assert r.status_code == 422
    r = client.post("/predict", json={})  # the advice fits a JSON request, not the form's
    assert r.status_code == 422 and "base64 in 'image'" in r.json()["detail"]
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("expected JSON") and "pydantic" not in r.text
    for bad in ({"params": {"top_k": 0}}, {"json": {"image": base64.b64encode(good).decode(), "top_k": -5}}):
        r = client.post("/predict", files=None if "json" in bad else {"file": ("a.jpg", good, "image/jpeg")}, **bad)
        assert r.status_code == 422, bad  # top_k 0 answered 3 labels, -5 one


def test_decompression_bomb_is_refused(client):
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")  # 81 Mpx in a few kB
    r = client.post("/predict", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_concurrent_requests_are_batched():
    """A slow model and 16 requests at once: the batcher answers them in fewer model calls than requests."""
    import asyncio

    import numpy as np

    from fruitlens.serve.batcher import Batcher

    calls = []

    def slow_forward(x):
        calls.append(len(x))
        time.sleep(0.05)
        return {"logits": np.repeat(x.reshape(len(x), -1)[:, :1].astype(np.float32), 2, axis=1)}

    async def go():
        b = Batcher(slow_forward, max_batch=8)
        outs = await asyncio.gather(*[b.submit(np.full((1, 2, 2, 3), i, np.uint8)) for i in range(16)])
        await b.stop()
        return b, outs

    batcher, outs = asyncio.run(go())
    assert [float(o["logits"][0, 0]) for o in outs] == list(range(16))  # each request gets its own rows back
    assert batcher.items == 16 and batcher.batches == len(calls) < 16 and max(calls) <= 8


def test_batcher_splits_a_large_request_into_bounded_calls():
    import asyncio

    import numpy as np

    from fruitlens.serve.batcher import Batcher

    calls = []
    b = Batcher(lambda x: calls.append(len(x)) or {"logits": np.zeros((len(x), 2), np.float32)}, max_batch=4)

    async def go():
        out = await b.submit(np.zeros((10, 2, 2, 3), np.uint8))
        await b.stop()
        return out

    assert asyncio.run(go())["logits"].shape == (10, 2) and calls == [4, 4, 2]


def test_a_request_of_many_images_decodes_a_few_at_a_time(trained_run, monkeypatch):
    # each image may decode to --max-pixels: a request of 64 must not hold them all in memory at once
    import threading

    from fruitlens.serve import routes

    app = create_app(ServeSettings(str(trained_run)))
    with TestClient(app) as c:
        real = app.state.predictor
        decode = real.pixels
        lock, now, peak = threading.Lock(), [0], [0]

        def pixels(data):
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.05)
            with lock:
                now[0] -= 1
            return decode(data)

        monkeypatch.setattr(real, "pixels", pixels)
        files = [("files", (f"{i}.jpg", jpeg_bytes(fruit_image("apple", i, 48)), "image/jpeg")) for i in range(24)]
        r = c.post("/predict", files=files)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 24
    slots = routes.DECODE_SLOTS._initial_value
    assert 2 <= peak[0] <= slots < 24


def test_dependency_override_reaches_predict(trained_run):
    import numpy as np

    app = create_app(ServeSettings(str(trained_run)))
    with TestClient(app) as c:
        real = app.state.predictor
        fake = Predictor(
            lambda x: {"logits": np.tile(np.array([[0.0, 5.0]], np.float32), (len(x), 1))},
            ["x<script>", "y"],
            real.preprocessing,
            "fake",
        )
        app.dependency_overrides[get_predictor] = lambda: fake
        assert c.get("/labels").json() == {"labels": ["x<script>", "y"]}
        r = c.post("/predict", files={"file": ("a.jpg", jpeg_bytes(fruit_image("apple", 1, 48)), "image/jpeg")})
        assert r.status_code == 200 and r.json()["label"] == "y" and r.json()["top_k"][1]["label"] == "x<script>"
        app.dependency_overrides.clear()
        r = c.post("/predict", files={"file": ("a.jpg", jpeg_bytes(fruit_image("apple", 1, 48)), "image/jpeg")})
        assert r.json()["label"] in real.classes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model, *extra):
    """``fruitlens serve`` in a subprocess on a free loopback port; returns (process, url) once /health answers."""
    import tempfile

    port = _free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server's access log
    proc = subprocess.Popen(
        [sys.executable, "-m", "fruitlens", "serve", str(model), "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG  # a safety net against a hang, not a speed target
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(log.read().decode())
            time.sleep(0.25)
    proc.kill()
    pytest.fail(f"fruitlens serve did not answer on {url}")


def _stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def live_server(trained_run):
    proc, url = _start_server(trained_run)
    yield url
    _stop_server(proc)


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= {int(x) for x in (task / "children").read_text().split()}
    return kids


def test_serve_with_two_worker_processes(trained_run):
    from concurrent.futures import ThreadPoolExecutor

    proc, url = _start_server(trained_run, "--workers", "2")
    try:
        jpeg = jpeg_bytes(fruit_image("kiwi", 3, 48))
        boundary = "fruitlens-test-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="k.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + jpeg
            + f"\r\n--{boundary}--\r\n".encode()
        )
        ctype = f"multipart/form-data; boundary={boundary}"
        want = Predictor.load(trained_run).predict([Image.open(io.BytesIO(jpeg))])[0].label

        def post(_):
            req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": ctype})
            with urllib.request.urlopen(req, timeout=HANG) as r:
                top = json.loads(r.read())
            with urllib.request.urlopen(url + "/health", timeout=HANG) as r:
                return top["label"], json.loads(r.read())["worker_pid"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(40)))
        workers = _children(proc.pid)
        # uvicorn's supervisor holds the socket; its two workers are spawned Python processes
        assert len([w for w in workers if "spawn_main" in _cmdline(w)]) == 2
        assert {label for label, _ in answers} == {want}
        assert {pid for _, pid in answers} <= workers and proc.pid not in {pid for _, pid in answers}
    finally:
        _stop_server(proc)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_serve_with_a_missing_model_says_so(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fruitlens", "serve", str(tmp_path / "nope"), "--workers", "2"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        timeout=HANG,
    )
    assert r.returncode != 0 and "error:" in r.stderr and "nope" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.browser
def test_upload_page_in_headless_chromium(live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium(tmp_path)
    try:
        browser.get(live_server + "/")
        WebDriverWait(browser, HANG).until(EC.text_to_be_present_in_element((By.ID, "model"), "4 classes"))
        img = tmp_path / "lemon.jpg"
        fruit_image("lemon", 11, 48).save(img)
        browser.find_element(By.ID, "file").send_keys(str(img))
        WebDriverWait(browser, HANG).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#bars .row.top")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
        labels = [r.get_attribute("data-label") for r in rows]
        assert len(rows) == 3 and set(labels) <= {"apple", "kiwi", "lemon", "plum"}
        assert "lemon.jpg:" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "preview").is_displayed()
        browser.save_screenshot(str(tmp_path / "page.png"))
        # an upload that is not an image shows the server's message, not a crash
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(browser, HANG).until(EC.text_to_be_present_in_element((By.ID, "error"), "not an image"))
    finally:
        browser.quit()
