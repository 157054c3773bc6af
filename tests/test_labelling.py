"""A few labelled photos of the user's setting: suggest -> label -> train --add, and the service's feedback."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import HANG, chromium, file_hashes, fruit_image, jpeg_bytes, make_tree, mobilenet_cached, need


def _photo(label: str, seed: int):
    """A 'photo' of the user's setting: the fruit off centre on a coloured, noisy background (not a studio shot)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bg = rng.integers(60, 200, 3)
    canvas = np.clip(bg + rng.normal(0, 20, (96, 96, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    img.paste(fruit_image(label, seed, 56), tuple(int(v) for v in rng.integers(0, 40, 2)))
    return img


# --- which photos to label ---


def _blobs(sizes, dim=16, seed=0, spread=0.05):
    """Features in len(sizes) tight clusters of the given sizes, far apart; returns (features, cluster of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 5
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def test_cold_start_picks_one_typical_photo_per_kind_biggest_first():
    from fruitlens.labelling.select import embed, pick_photos

    x, cluster = _blobs([40, 25, 10, 3])
    picks = pick_photos(x, 4)
    assert sorted(cluster[[p.index for p in picks]]) == [0, 1, 2, 3]  # every kind of photo, once
    assert [p.cluster_size for p in picks] == [40, 25, 10, 3]  # the kinds most photos look like first
    # the pick is the photo nearest its cluster's centre (on the normalised features), not an odd one
    z = embed(x)
    members = np.flatnonzero(cluster == 0)
    centre = z[members].mean(0)
    assert picks[0].index == members[np.argmin(((z[members] - centre) ** 2).sum(1))]
    assert "typical of 40" in picks[0].why


def test_near_copies_count_once_and_a_small_pool_gives_every_distinct_photo():
    from fruitlens.labelling.select import pick_photos

    x, _ = _blobs([6, 6])
    groups = np.array([0, 0, 0, 1, 2, 3, 4, 4, 5, 6, 7, 8])  # photos 0-2 are one burst, 6-7 another
    picks = pick_photos(x, 50, groups=groups)
    assert len(picks) == 9 and len({groups[p.index] for p in picks}) == 9  # one per group, the budget not reached
    assert {p.near_copies for p in picks if groups[p.index] == 0} == {2}
    with pytest.raises(ValueError):
        pick_photos(x, 0)


def test_once_photos_are_labelled_the_covered_kinds_give_way_to_new_and_unsure_ones():
    from fruitlens.labelling.select import pick_photos

    x, cluster = _blobs([30, 30, 30, 30], seed=1)
    labelled = x[cluster == 0][:3]  # photos like those of cluster 0 are labelled already
    margins = np.ones(len(x))
    unsure = np.flatnonzero(cluster == 3)[5]
    margins[unsure] = 0.01  # the model can hardly decide on this one
    picks = pick_photos(x, 4, margins=margins, labelled=labelled)  # 3 typical, 1 unsure (30%)
    chosen = cluster[[p.index for p in picks]]
    assert 0 not in chosen and set(chosen) == {1, 2, 3}
    assert unsure in [p.index for p in picks] and any("unsure" in p.why for p in picks)


# --- labels CSVs ---


def _labels_csv(path: Path, rows, header=("path", "label")) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_labels_csv_rows_that_cannot_be_used_are_listed_with_the_reason(tmp_path):
    from fruitlens.errors import DataError
    from fruitlens.labelling.labels import read_labels

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        fruit_image("kiwi", i).save(photos / f"k{i}.png")
    (photos / "notes.jpg").write_text("not an image")
    sub = tmp_path / "csvs"
    sub.mkdir()
    labels = _labels_csv(
        sub / "labels.csv",
        [
            ("../photos/k0.png", "kiwi"),  # relative to the CSV's folder
            (str(photos / "k1.png"), " Kiwi gold "),  # absolute; a new class name, stripped
            ("../photos/k2.png", "-"),  # skipped on purpose
            ("../photos/k3.png", ""),  # not labelled yet
            ("../photos/gone.png", "kiwi"),
            ("../photos/notes.jpg", "kiwi"),
            ("../photos/k0.png", "kiwi"),  # the same file again, the same label
        ],
    )
    before = file_hashes(tmp_path)
    got = read_labels([labels], workers=1)
    assert [(Path(p.path).name, p.label) for p in got.photos] == [("k0.png", "kiwi"), ("k1.png", "Kiwi gold")]
    why = {w.split()[-1].split("/")[-1]: reason for w, reason in got.skipped}
    assert "marked '-'" in why["k2.png"] and "empty label" in why["k3.png"]
    assert "no such file" in why["gone.png"] and "not a readable image" in why["notes.jpg"]
    assert file_hashes(tmp_path) == before  # nothing moved, changed or deleted
    with pytest.raises(DataError, match="lacks the column"):
        read_labels([_labels_csv(tmp_path / "bad.csv", [("a.png",)], header=("file",))])
    with pytest.raises(DataError, match="none of its 1 row"):
        read_labels([_labels_csv(tmp_path / "empty.csv", [("photos/k0.png", "")])])
    with pytest.raises(DataError, match="not found"):
        read_labels([tmp_path / "nowhere.csv"])


def test_a_photo_that_copies_an_image_of_the_data_is_refused_with_the_reason(tmp_path):
    from fruitlens.data.check import check
    from fruitlens.data.scan import scan
    from fruitlens.labelling.labels import read_labels, refuse_copies

    data = make_tree(tmp_path / "data", per_class=4, classes=("kiwi", "plum"))
    mine = tmp_path / "mine.png"
    fruit_image("plum", 999, 80).save(mine)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes((data / "kiwi" / "kiwi_001.jpg").read_bytes())
    report = check(scan(data))
    from dataclasses import replace

    manifest = report.manifest.with_records(replace(r, split="test") for r in report.manifest.records)
    got = refuse_copies(
        read_labels([_labels_csv(tmp_path / "l.csv", [("mine.png", "plum"), ("copy.jpg", "kiwi")])]),
        manifest,
        report.files,
    )
    assert [Path(p.path).name for p in got.photos] == ["mine.png"]
    ((where, why),) = [s for s in got.skipped if "copy.jpg" in s[0]]
    assert "copy of a test image" in why and "kiwi_001.jpg" in why and "leak" in why


# --- suggest ---


def _photo_folder(root: Path) -> Path:
    """Photos of the setting in nested folders whose names say nothing of their kind, with a broken file."""
    for i, label in enumerate(["apple", "kiwi", "lemon", "plum"] * 4):
        folder = root / f"day{i % 3}" / "shelf"
        folder.mkdir(parents=True, exist_ok=True)
        _photo(label, 7000 + i).save(folder / f"IMG_{i:04d}.jpg")
    (root / "day0" / "broken.jpg").write_bytes(jpeg_bytes(fruit_image("kiwi", 1))[:200])
    return root


def test_suggest_writes_the_csv_and_a_self_contained_page_and_touches_no_photo(trained_run, tmp_path, capsys):
    from fruitlens.cli.main import main

    photos = _photo_folder(tmp_path / "photos")
    before = file_hashes(photos)
    out = tmp_path / "to-label"
    assert main(["suggest", str(trained_run), str(photos), "--budget", "5", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "picked 5 of 16 photos" in said and "broken.jpg" in said and "label.html" in said
    rows = list(csv.DictReader((out / "to-label.csv").open()))
    assert len(rows) == 5 and {"path", "label", "guess", "score", "top_k", "why"} <= set(rows[0])
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)
    assert all(r["label"] == r["guess"] and r["guess"] in ("apple", "kiwi", "lemon", "plum") for r in rows)
    page = (out / "label.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and "http" not in page.split("<script")[0]  # self-contained
    assert file_hashes(photos) == before
    # a budget larger than the folder: every distinct photo, and a note
    assert main(["suggest", str(trained_run), str(photos), "--budget", "500", "--out", str(out)]) == 0
    assert "fewer than --budget 500" in capsys.readouterr().out
    # bad input: a budget of 0, an empty folder
    with pytest.raises(SystemExit) as exit_:
        main(["suggest", str(trained_run), str(photos), "--budget", "0"])
    assert exit_.value.code == 2 and "expected a whole number from 1" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["suggest", str(trained_run), str(tmp_path / "empty"), "--out", str(out)]) == 3
    assert "no image files found" in capsys.readouterr().err


def test_python_api_suggest_excludes_photos_labelled_already(trained_run, tmp_path):
    import fruitlens

    photos = _photo_folder(tmp_path / "photos")
    first = fruitlens.suggest(trained_run, photos, budget=4, out=tmp_path / "a")
    second = fruitlens.suggest(trained_run, photos, budget=4, out=tmp_path / "b", labelled=[first.csv])
    assert second.labelled == 4 and not {r.path for r in first.picks} & {r.path for r in second.picks}


# --- the labelling page, in the browser ---


@pytest.mark.browser
def test_label_page_from_the_file_system_labels_by_keys_and_saves_a_csv_that_add_reads(trained_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    import fruitlens
    from fruitlens.labelling.labels import read_labels

    photos = _photo_folder(tmp_path / "photos")
    res = fruitlens.suggest(trained_run, photos, budget=4, out=tmp_path / "to-label")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = chromium(tmp_path, downloads, size="1200,900")
    try:
        browser.get(res.page.as_uri())
        body = browser.find_element(By.TAG_NAME, "body")
        guess = browser.find_element(By.CSS_SELECTOR, "#choices button").get_attribute("data-label")
        body.send_keys("1")  # photo 1: the model's guess
        body.send_keys("s")  # photo 2: skipped
        typed = browser.find_element(By.ID, "typed")
        body.send_keys("/")  # photo 3: a class the model does not have, typed
        typed.send_keys("Dragon <fruit>", Keys.ENTER)
        assert "2 of 4 labelled, 1 skipped" in browser.find_element(By.ID, "count").text
        names = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#grid figcaption")]
        assert names[:4] == [guess, "skipped", "Dragon <fruit>", "?"]  # shown as text, never parsed as HTML
        body.send_keys(Keys.CONTROL, "s")
        deadline = time.monotonic() + HANG
        saved = downloads / "to-label.csv"
        while not saved.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        # the answers survive a reload (kept in the browser until saved)
        browser.refresh()
        WebDriverWait(browser, HANG).until(lambda b: "2 of 4 labelled" in b.find_element(By.ID, "count").text)
    finally:
        browser.quit()
    rows = list(csv.DictReader(saved.open()))
    assert [r["label"] for r in rows] == [guess, "-", "Dragon <fruit>", "-"]  # unanswered photos are skipped
    got = read_labels([saved])
    assert sorted(p.label for p in got.photos) == sorted([guess, "Dragon <fruit>"])


# --- train --add ---


@pytest.fixture(scope="module")
def added_run(tmp_path_factory):
    """A MobileNetV2 run on synthetic studio shots of three kinds plus labelled 'photos' of four, one of them new."""
    need(mobilenet_cached(), "MobileNetV2's ImageNet weights are not in the torch cache (make setup imports them)")
    import fruitlens

    base = tmp_path_factory.mktemp("added")
    data = make_tree(base / "data", per_class=16, classes=("apple", "kiwi", "lemon"), size=64)
    rows = []
    for label in ("apple", "kiwi", "lemon", "plum"):
        for i in range(8):
            path = base / "shots" / f"{label}-{i}.png"
            path.parent.mkdir(exist_ok=True)
            _photo(label, 5000 + i).save(path)
            rows.append((f"shots/{path.name}", label))
    labels = _labels_csv(base / "labels.csv", rows + [("shots/gone.png", "kiwi")])
    unlabeled = base / "unlabeled"  # --adapt-to combines with --add: pseudo-labels on photos nobody labelled
    unlabeled.mkdir()
    for i in range(12):
        _photo(("apple", "kiwi", "lemon", "plum")[i % 4], 9000 + i).save(unlabeled / f"u{i}.png")
    result = fruitlens.train(data, base / "run", add=[labels], adapt_to=unlabeled, img_size=64, workers=0)
    return base, result


def test_train_add_learns_the_new_class_and_reports_the_photos(added_run):
    from fruitlens.inference.predictor import Predictor

    base, result = added_run
    run = result.run.path
    assert json.loads((run / "labels.json").read_text()) == ["apple", "kiwi", "lemon", "plum"]
    note = result.photos
    assert note.photos == 32 and note.new_classes == ["plum"] and note.skipped == 1
    assert note.accuracy is not None and note.held_out >= 20 and note.curve[0].photos == 0
    assert note.calibrated_on_photos and "labelled photos of your setting" in result.trust.source
    assert result.report.adaptation is not None and result.report.adaptation.images == 12  # --adapt-to ran too
    pred = Predictor.load(run)  # the exported ONNX model knows the new class
    plums = [base / "shots" / f"plum-{i}.png" for i in range(8)]
    assert [p.label for p in pred.predict(plums)].count("plum") >= 6
    page = (run / "report.html").read_text()
    assert 'id="your-photos"' in page and "Would more labels pay?" in page and "the data alone" in page
    assert json.loads((run / "photos.json").read_text())["photos"] == 32
    assert (run / "photos.csv").is_file()


def test_train_add_bad_input_fails_before_training(tmp_path):
    from fruitlens.cli.main import main

    data = make_tree(tmp_path / "data", per_class=6)
    assert main(["train", str(data), "--add", str(tmp_path / "none.csv"), "--out", str(tmp_path / "r")]) == 3
    assert not (tmp_path / "r").exists()  # nothing left behind
    assert (
        main(
            [
                "train",
                str(data),
                "--add",
                str(tmp_path / "none.csv"),
                "--model",
                "small_cnn",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )


# --- the service collects labels ---


def test_serve_feedback_keeps_each_photo_once_by_content_hash_and_refuses_bad_input(trained_run, tmp_path):
    from fruitlens.labelling.labels import read_labels
    from fruitlens.serve.app import create_app
    from fruitlens.serve.settings import ServeSettings

    store = tmp_path / "fb"
    app = create_app(ServeSettings(str(trained_run), feedback=str(store), feedback_max_photos=2))
    jpeg = jpeg_bytes(fruit_image("kiwi", 3, 48))
    with TestClient(app) as c:
        assert c.get("/health").json()["feedback"] is True
        r = c.post(
            "/feedback",
            files={"file": ("../../etc/passwd", jpeg, "image/jpeg")},
            data={"label": "Kiwi", "predicted": "apple", "score": "0.4"},
        )
        assert r.status_code == 200 and r.json()["new"] and r.json()["labelled"] == 1
        name = r.json()["path"]
        assert name.startswith("photos/") and name.endswith(".jpg") and "passwd" not in name
        assert (
            c.post("/feedback", files={"file": ("x.jpg", jpeg, "image/jpeg")}, data={"label": "Kiwi"}).json()["new"]
            is False
        )
        assert (
            c.post("/feedback", files={"file": ("x.txt", b"hello", "text/plain")}, data={"label": "Kiwi"}).status_code
            == 415
        )
        for label in ("", "-", "a/b", "x" * 101):
            assert (
                c.post("/feedback", files={"file": ("x.jpg", jpeg, "image/jpeg")}, data={"label": label}).status_code
                == 422
            )
        other = jpeg_bytes(fruit_image("plum", 4, 48))
        assert (
            c.post("/feedback", files={"file": ("p.jpg", other, "image/jpeg")}, data={"label": "plum"}).status_code
            == 200
        )
        full = c.post(
            "/feedback",
            files={"file": ("q.jpg", jpeg_bytes(fruit_image("lemon", 5, 48)), "image/jpeg")},
            data={"label": "lemon"},
        )
        assert full.status_code == 507 and "full" in full.json()["detail"]
    assert len(list((store / "photos").iterdir())) == 2
    got = read_labels([store / "labels.csv"])  # what train --add reads
    assert sorted(p.label for p in got.photos) == ["Kiwi", "plum"]  # the later row of the same photo wins
    off = create_app(ServeSettings(str(trained_run)))
    with TestClient(off) as c:
        assert (
            c.post("/feedback", files={"file": ("x.jpg", jpeg, "image/jpeg")}, data={"label": "k"}).status_code == 404
        )


def test_serve_label_serves_a_folder_by_number_and_saves_each_answer(trained_run, tmp_path):
    from fruitlens.serve.app import create_app
    from fruitlens.serve.settings import ServeSettings

    photos = _photo_folder(tmp_path / "photos")
    before = file_hashes(photos)
    out = tmp_path / "answers" / "to-label.csv"
    app = create_app(ServeSettings(str(trained_run), label=str(photos), label_out=str(out)))
    with TestClient(app) as c:
        page = c.get("/label")
        assert page.status_code == 200 and "label/answer" in page.text and page.text.count("label/photo/") == 16
        img = c.get("/label/photo/3")
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert c.get("/label/photo/16").status_code == 404 and c.get("/label/photo/..%2F..").status_code in (404, 422)
        assert c.post("/label/answer", json={"id": 3, "label": "Mango"}).json()["labelled"] == 1
        assert c.post("/label/answer", json={"id": 4, "label": "-"}).json()["labelled"] == 1
        assert c.post("/label/answer", json={"id": 99, "label": "x"}).status_code == 404
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16 and [r["label"] for r in rows].count("Mango") == 1 and rows[4]["label"] == "-"
    assert file_hashes(photos) == before
    with TestClient(create_app(ServeSettings(str(trained_run), label=str(photos), label_out=str(out)))) as c:
        assert "Mango" in c.get("/label").text  # the answers of an earlier session come back


@pytest.mark.browser
def test_upload_page_feedback_in_headless_chromium(trained_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from test_serve import _start_server, _stop_server

    store = tmp_path / "fb"
    proc, url = _start_server(trained_run, "--feedback", str(store))
    browser = chromium(tmp_path)
    try:
        browser.get(url + "/")
        WebDriverWait(browser, HANG).until(EC.text_to_be_present_in_element((By.ID, "model"), "4 classes"))
        img = tmp_path / "plum.jpg"
        fruit_image("plum", 21, 48).save(img)
        browser.find_element(By.ID, "file").send_keys(str(img))
        WebDriverWait(browser, HANG).until(EC.visibility_of_element_located((By.ID, "feedback")))
        browser.find_element(By.ID, "fb-new").send_keys("Damson")
        browser.find_element(By.ID, "fb-save").click()
        WebDriverWait(browser, HANG).until(
            EC.text_to_be_present_in_element((By.ID, "feedback-status"), "Saved as Damson")
        )
    finally:
        browser.quit()
        _stop_server(proc)
    rows = list(csv.DictReader((store / "labels.csv").open()))
    assert [r["label"] for r in rows] == ["Damson"] and (store / rows[0]["path"]).is_file()
