"""Reliability: interrupted and killed runs resume, a run folder is one command's at a time, a run folder someone sent
cannot run code, bad data goes through every command with the bad files listed and the user's files untouched.

Timeouts here are safety nets against a hang (generous: minutes), never a speed target.
"""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fruitlens.cli.main import main
from conftest import HANG, ROOT, file_hashes, fruit_image, make_tree, mobilenet_cached, need


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _history(run: Path) -> list[tuple[str, int]]:
    return [(r["phase"], int(float(r["epoch"]))) for r in csv.DictReader((run / "history.csv").open())]


def _start(args: list[str]) -> subprocess.Popen:
    # Ctrl-C's default action in the child: a suite started in the background ('make test &' from a script) ignores
    # SIGINT, and an ignored signal stays ignored across exec, so the run would never see it
    return subprocess.Popen(
        [sys.executable, "-m", "fruitlens", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    seen = []
    deadline = time.monotonic() + HANG
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"never saw {text!r}:\n" + "".join(seen[-30:]))


def _train_args(data: Path, out: Path, epochs: int = 400) -> list[str]:
    return [
        "train",
        str(data),
        "--out",
        str(out),
        "--model",
        "small_cnn",
        "--img-size",
        "32",
        "--epochs",
        str(epochs),
        "--workers",
        "0",
        "--target-acc",
        "0",
        "--group",
        "none",
        "fit.early_stopping_patience=1000",
    ]


@pytest.mark.parametrize("how", ["sigint", "kill -9"])
def test_interrupted_run_resumes_after_its_last_finished_epoch(tmp_path, how):
    data = make_tree(tmp_path / "d", per_class=12, size=40)
    out = tmp_path / "run"
    proc = _start(_train_args(data, out, epochs=6))
    _wait_for(proc, "[full] epoch 2:")
    proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
    _, err = proc.communicate(timeout=HANG)
    if how == "sigint":
        assert proc.returncode == 130 and "continue with 'fruitlens train --resume" in err
        assert (out / "checkpoints" / "best.ckpt").is_file()  # the best model so far is usable at once
    else:
        assert proc.returncode == -signal.SIGKILL
    before = _history(out)
    assert before[:2] == [("full", 1), ("full", 2)]
    assert main(["train", "--resume", str(out)]) == 0
    after = _history(out)
    epochs = [e for _, e in after]
    assert after[: len(before)] == before and epochs == list(range(1, 7))  # continued; no epoch twice, none lost
    assert json.loads((out / "report.json").read_text())["metrics"]["n"] > 0
    with pytest.raises(Exception, match="already holds a trained run"):
        from fruitlens.config import TrainConfig, apply_overrides
        from fruitlens.pipelines.train import train

        train(apply_overrides(TrainConfig(), {"data.path": str(data)}).validated(), out)


def test_sigint_mid_fine_tune_then_resume(tmp_path):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = make_tree(tmp_path / "d", per_class=12, size=64)
    out = tmp_path / "run"
    args = [
        "train",
        str(data),
        "--out",
        str(out),
        "--img-size",
        "64",
        "--epochs",
        "3",
        "--workers",
        "0",
        "--target-acc",
        "0",
        "--group",
        "none",
        "--fine-tune-blocks",
        "1",
        "--fine-tune-epochs",
        "4",
        "fit.early_stopping_patience=1000",
    ]
    proc = _start(args)
    _wait_for(proc, "[fine-tune] epoch 1:")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=HANG)
    assert proc.returncode == 130
    before = _history(out)
    assert [p for p, _ in before].count("head") == 3 and ("fine-tune", 1) in before
    assert main(["train", "--resume", str(out)]) == 0
    after = _history(out)
    assert after[: len(before)] == before  # the head is not trained again
    assert [e for p, e in after if p == "fine-tune"] == [1, 2, 3, 4] and [p for p, _ in after].count("head") == 3
    uninterrupted = ["head"] * 3 + ["fine-tune"] * 4
    assert [p for p, _ in after] == uninterrupted


def test_a_rejected_fine_tune_stays_rejected_on_resume(tmp_path, caplog):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    caplog.set_level(logging.INFO, logger="fruitlens")
    data = make_tree(tmp_path / "d", per_class=12, size=64)
    out = tmp_path / "run"
    # a learning rate that wrecks the backbone: the fine-tune worsens the validation loss and is not kept
    args = [
        "train",
        str(data),
        "--out",
        str(out),
        "--img-size",
        "64",
        "--epochs",
        "3",
        "--workers",
        "0",
        "--target-acc",
        "0",
        "--group",
        "none",
        "--fine-tune-blocks",
        "2",
        "--fine-tune-epochs",
        "1",
        "fit.fine_tune_lr=50",
        "fit.early_stopping_patience=1000",
    ]
    assert main(args) == 0
    assert "[fine-tune] did not improve the validation loss" in caplog.text
    source = json.loads((out / "report.json").read_text())["trust"]["source"]
    assert source.startswith("out-of-fold")  # calibrated on the frozen backbone it kept
    caplog.clear()
    for name in ("checkpoints/best.ckpt", "report.json"):  # as if stopped after the phases, before shipping
        (out / name).unlink()
    assert main(["train", "--resume", str(out)]) == 0
    assert "[fine-tune] already done" in caplog.text
    assert "[fine-tune] did not improve the validation loss" in caplog.text  # still rejected, not brought back
    assert json.loads((out / "report.json").read_text())["trust"]["source"] == source


def test_second_train_on_the_same_folder_refuses_while_the_first_runs(tmp_path, capsys):
    data = make_tree(tmp_path / "d", per_class=12, size=40)
    out = tmp_path / "run"
    proc = _start(_train_args(data, out, epochs=4))
    try:
        _wait_for(proc, "[full] epoch 1:")
        assert main(_train_args(data, out, epochs=4)) == 6  # ExitCode.RUN_DIR
        err = capsys.readouterr().err
        assert "another fruitlens command (pid" in err and "is writing this run folder" in err
        assert main(["train", "--resume", str(out)]) == 6
    finally:
        proc.communicate(timeout=HANG)
    assert proc.returncode == 0 and [e for _, e in _history(out)] == [1, 2, 3, 4]  # the first run is whole
    assert json.loads((out / "report.json").read_text())["metrics"]["n"] > 0


class _RunsCode:
    """Unpickling this would create a file: the stand-in for code an attacker wants run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = run_copy / "checkpoints" / "best.ckpt"
    payload = torch.load(ckpt, weights_only=True)
    payload["evil"] = _RunsCode(marker)
    torch.save(payload, ckpt)
    (run_copy / "export" / "model.onnx").unlink()  # else predict would take the (safe) ONNX model
    assert main(["predict", str(run_copy), str(ROOT / "README.md")]) == 6  # ExitCode.RUN_DIR
    err = capsys.readouterr().err
    assert "refused to load" in err and "could run code" in err and not marker.exists()
    with pytest.raises(Exception, match="refused to load"):
        from fruitlens.models.checkpoint import load_model

        load_model(ckpt)
    assert not marker.exists()
    # Lightning's own checkpoints (for --resume) are read as tensors only as well
    last = run_copy / "checkpoints" / "full" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    state["evil"] = _RunsCode(marker)
    torch.save(state, last)
    (run_copy / "checkpoints" / "full" / "done").unlink()
    assert main(["train", "--resume", str(run_copy)]) == 6
    assert "refused to load" in capsys.readouterr().err and not marker.exists()


def _messy_tree(root: Path) -> Path:
    make_tree(root, per_class=12, classes=("apple", "kiwi", "lemon"), size=48)
    good = (root / "apple" / "apple_000.jpg").read_bytes()
    (root / "apple" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "kiwi" / "zero.jpg").write_bytes(b"")
    fruit_image("lemon", 90).convert("CMYK").save(root / "lemon" / "cmyk.jpg")
    rgba = fruit_image("lemon", 91).convert("RGBA")
    rgba.putalpha(100)
    rgba.save(root / "lemon" / "rgba.png")
    fruit_image("kiwi", 92).convert("P").save(root / "kiwi" / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    fruit_image("apple", 93).save(root / "apple" / "rotated.jpg", exif=exif)
    Image.fromarray((np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20)).save(root / "apple" / "deep.png")
    Image.new("RGB", (1, 1), "red").save(root / "apple" / "one_pixel.png")
    Image.new("RGB", (1, 4000), "red").save(root / "kiwi" / "strip.png")
    (root / "empty_class").mkdir()
    (root / "plum").mkdir()
    fruit_image("plum", 1).save(root / "plum" / "only.jpg")
    return root


BAD = {"truncated.jpg", "zero.jpg", "one_pixel.png", "strip.png"}


def test_bad_data_goes_through_every_command(tmp_path, capsys):
    data = _messy_tree(tmp_path / "messy")
    before = file_hashes(data)
    assert main(["check", str(data), "--json"]) == 1  # errors found, and said so
    found = json.loads(capsys.readouterr().out)
    errors = {Path(i["path"]).name: i["message"] for i in found["issues"] if i["severity"] == "error"}
    assert set(errors) == BAD and "truncated" in errors["truncated.jpg"] and "0 bytes" in errors["zero.jpg"]
    assert {i["code"] for i in found["issues"]} >= {"mode-converted", "exif-rotated", "empty-class", "tiny-class"}
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(data),
                "--out",
                str(run),
                "--model",
                "small_cnn",
                "--img-size",
                "32",
                "--epochs",
                "2",
                "--workers",
                "0",
                "--target-acc",
                "0",
            ]
        )
        == 0
    )
    report = json.loads((run / "report.json").read_text())
    assert {Path(e["path"]).name for e in report["dataset"]["excluded"]} == BAD  # every bad file, with its reason
    assert all(e["reason"] for e in report["dataset"]["excluded"])
    capsys.readouterr()
    assert main(["predict", str(run), str(data), "--json"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    failed = {Path(x["path"]).name: x["error"] for x in lines if "error" in x}
    assert set(failed) == BAD and "too small" in failed["strip.png"] and "0 bytes" in failed["zero.jpg"]
    assert main(["evaluate", str(run), str(data)]) == 0
    rep = json.loads((run / "eval" / "messy" / "report.json").read_text())
    assert {Path(b["path"]).name for b in rep["bad_images"]} == BAD and rep["unmapped_images"] == {}
    assert file_hashes(data) == before  # nothing changed, added or removed in the user's folder


def _server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def test_hostile_requests_against_the_real_server(trained_run, tmp_path):
    import http.client
    import io

    from test_serve import _start_server, _stop_server

    proc, url = _start_server(trained_run, "--max-images", "16", "--max-upload-mb", "2")
    host, port = url.removeprefix("http://").split(":")

    def post(body: bytes, ctype: str, chunked: bool = False) -> tuple[int, str]:
        conn = http.client.HTTPConnection(host, int(port), timeout=HANG)
        if chunked:  # no Content-Length: the server must count what arrives
            conn.putrequest("POST", "/predict")
            conn.putheader("Content-Type", ctype)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for i in range(0, len(body), 1 << 16):
                piece = body[i : i + (1 << 16)]
                try:
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                except (BrokenPipeError, ConnectionResetError):
                    break
            try:
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        return r.status, r.read().decode()

    def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
        b = "hostile-boundary"
        body = b"".join(
            f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="{n}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + d
            + b"\r\n"
            for n, d in files
        )
        return body + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"

    def png(size) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
        return buf.getvalue()

    try:
        start = _server_rss_mb(proc.pid)
        status, text = post(*multipart([("strip.png", png((1, 20000)))]))
        assert status == 422 and "too small" in text
        status, text = post(*multipart([("strip.png", png((20, 20000)))]))
        assert status == 422 and "aspect ratio" in text
        status, _ = post(*multipart([("wide.png", png((400, 3990)))]))  # 1:10, legal: answered, at crop cost
        assert status == 200
        tiny = png((40, 40))
        status, text = post(*multipart([(f"{i}.png", tiny) for i in range(1500)]))
        assert status == 413 and "exceeds the limit of 16" in text
        status, text = post(*multipart([("big.jpg", b"\xff" * (3 * 2**20))]), chunked=True)
        assert status == 413 and "limit of 2 MB" in text
        status, _ = post(*multipart([("ok.png", tiny)] * 16))
        assert status == 200
        assert _server_rss_mb(proc.pid) - start < 400  # memory stays bounded (it grew by GBs before)
        with __import__("urllib.request").request.urlopen(url + "/health", timeout=HANG) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        _stop_server(proc)
