"""The label audit: confident learning, grouped folds, the gallery and CSV, relabel to a copy or a manifest."""

import csv
import json
import shutil

import numpy as np
import pytest

from fruitlens.cli.main import main
from fruitlens.evaluation.audit import (
    audit_labels,
    expected_precision,
    flag_images,
    neighbours_from_groups,
    neighbours_from_pairs,
    thresholds,
)
from conftest import file_hashes, make_tree, mobilenet_cached, need


def _noisy(n=600, k=4, flip=0.05, seed=0):
    """Calibrated-looking held-out probabilities: right and sure for most images, a look-alike pair (classes 0 and 1:
    a fifth of their images read as the other, never very surely), and labels with known flips (read surely as
    their true class)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    probs = np.full((n, k), 0.01)
    probs[np.arange(n), true] = 0.97
    confused = np.flatnonzero((true < 2) & (rng.random(n) < 0.2))
    probs[confused] = 0.01
    probs[confused, 1 - true[confused]] = 0.7  # read as the other look-alike class, not surely
    probs[confused, true[confused]] = 0.28
    probs /= probs.sum(1, keepdims=True)
    given = true.copy()
    clean = np.setdiff1d(np.arange(n), confused)
    flips = rng.choice(clean, int(flip * n), replace=False)
    given[flips] = (true[flips] + rng.integers(1, k, len(flips))) % k
    return probs, given, set(flips.tolist()), confused


def test_flips_are_listed_and_look_alike_classes_are_not():
    probs, given, flips, confused = _noisy()
    none = [np.zeros(0, np.int64)] * len(given)
    issues, alike = audit_labels(probs, given, np.ones(len(given), bool), none)
    found = {i.index for i in issues}
    assert found == flips  # every flip, and none of the look-alike confusions
    assert not found & set(confused.tolist())
    assert [(p.a, p.b) for p in alike][0] == (0, 1) and alike[0].share > 0.1  # the pair is a finding of its own
    assert all(e in set(confused.tolist()) for e in alike[0].examples)
    assert [i.rank for i in issues] == list(range(1, len(issues) + 1))
    hit = issues[0]
    assert hit.suggested != hit.label and hit.p_suggested > 0.9 and "never saw it" in hit.evidence
    assert expected_precision(issues) > 0.95
    # on the same data with no flips, nothing is listed
    assert (
        audit_labels(
            probs,
            np.where(np.isin(np.arange(len(given)), list(flips)), probs.argmax(1), given),
            np.ones(len(given), bool),
            none,
        )[0]
        == []
    )


def test_copies_speak_for_an_image_in_both_directions():
    # images 0-4: frames of one fruit labelled a (0) and read as a; frame 2 is filed under b (1)
    # images 5-9: frames of one fruit labelled a and all read as b (a fruit that looks like the other class)
    # images 10-11: a photo and its copy under two labels; the heads that never saw them read a
    probs = np.array([[0.9, 0.1]] * 5 + [[0.05, 0.95]] * 5 + [[0.9, 0.1]] * 2)
    labels = np.array([0, 0, 1, 0, 0] + [0] * 5 + [0, 1])
    groups = ["f1"] * 5 + ["f2"] * 5 + ["p"] * 2
    issues, alike = audit_labels(probs, labels, np.ones(12, bool), neighbours_from_groups(groups))
    assert [(i.index, i.kind, i.suggested) for i in issues] == [(2, "conflict", 0), (11, "conflict", 0)]
    assert "4 of its 4 near copies" in issues[0].evidence
    assert alike and (alike[0].a, alike[0].b, alike[0].a_as_b) == (0, 1, 5)  # the second fruit: look-alike
    # one copy under another label is not enough when the heads side with the image's own label; four are
    probs[[2, 11]] = [0.05, 0.95]
    assert [i.index for i in audit_labels(probs, labels, np.ones(12, bool), neighbours_from_groups(groups))[0]] == [2]
    pairs = neighbours_from_pairs(4, np.array([[0, 1], [1, 2]]))
    assert [p.tolist() for p in pairs] == [[1], [0, 2], [1], []]


def test_thresholds_and_the_rule_for_test_images():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9]])
    given = np.array([0, 0, 0, 1, 1, 1])
    t = thresholds(probs, given)
    assert t == pytest.approx([(0.9 + 0.8 + 0.3) / 3, (0.3 + 0.8 + 0.9) / 3])
    flagged, suggested = flag_images(np.array([[0.02, 0.98], [0.2, 0.8], [0.9, 0.1]]), np.array([0, 0, 0]))
    assert flagged.tolist() == [True, False, False] and suggested[0] == 1  # 20% for its label is not proof


def _audited_tree(tmp_path):
    data = make_tree(tmp_path / "photos", per_class=32, classes=("apple", "kiwi", "lemon"), size=64)
    shutil.move(str(data / "lemon" / "lemon_000.jpg"), str(data / "apple" / "mislabelled_0.jpg"))  # a lemon under apple
    shutil.copy(data / "kiwi" / "kiwi_005.jpg", data / "lemon" / "copy_of_kiwi.jpg")  # an exact copy, other label
    return data


def test_check_labels_finds_the_mislabelled_and_relabel_applies_the_decisions(tmp_path, capsys):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = _audited_tree(tmp_path)
    before = file_hashes(data)
    out = tmp_path / "audit"
    assert main(["check", str(data), "--labels", "--json", "--audit-out", str(out), "--folds", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    issues = result["label_issues"]
    names = {i["path"].rsplit("/", 1)[-1]: i for i in issues}
    planted = {"mislabelled_0.jpg", "mislabelled_1.jpg", "copy_of_kiwi.jpg", "kiwi_005.jpg"}
    assert {n for n, i in names.items() if i["kind"] == "label"} <= planted  # nothing clean is accused
    found = sorted({"mislabelled_0.jpg", "mislabelled_1.jpg"} & set(names))
    assert found and names[found[0]]["suggested"] == "lemon" and names[found[0]]["label"] == "apple"
    assert names["copy_of_kiwi.jpg"]["kind"] == "conflict"  # the check's copies under other labels join the list
    assert set(issues[0]) >= {"path", "label", "suggested", "score"}
    assert [i["rank"] for i in issues] == list(range(1, len(issues) + 1))
    page = (out / "label_issues.html").read_text()
    assert page.count("<figure") == len(issues) and "data:image/jpeg;base64," in page
    rows = list(csv.DictReader((out / "label_issues.csv").open()))
    assert len(rows) == len(issues) and all(r["new_label"] == "" for r in rows)
    # a person decides: the first lemon back to lemon, the second dropped, the rest as they are
    for r in rows:
        if r["path"].endswith(found[0]):
            r["new_label"] = "lemon"
        elif r["path"].endswith("copy_of_kiwi.jpg"):
            r["new_label"] = "drop"
    with (out / "label_issues.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fixed = tmp_path / "fixed"
    assert main(["relabel", str(data), str(out / "label_issues.csv"), "--out", str(fixed)]) == 0
    assert "1 relabelled, 1 dropped" in capsys.readouterr().out
    assert (fixed / "lemon" / found[0]).is_file() and not list(fixed.rglob("copy_of_kiwi.jpg"))
    assert len(list(fixed.rglob("*.jpg"))) == len(before) - 1
    assert main(["relabel", str(data), str(out / "label_issues.csv"), "--manifest", str(tmp_path / "m.csv")]) == 0
    m = {r["path"].rsplit("/", 1)[-1]: r["label"] for r in csv.DictReader((tmp_path / "m.csv").open())}
    assert m[found[0]] == "lemon" and "copy_of_kiwi.jpg" not in m and m["kiwi_000.jpg"] == "kiwi"
    assert file_hashes(data) == before  # the user's images: not moved, renamed, changed or deleted
    # a second audit of the same images takes their features from the store (no second feature pass)
    assert main(["check", str(data), "--labels", "--audit-out", str(tmp_path / "again")]) == 0
    assert "look mislabelled" in capsys.readouterr().out


def test_relabel_refuses_unsafe_targets(tmp_path, capsys):
    data = make_tree(tmp_path / "photos", per_class=3, classes=("apple", "kiwi"), size=40)
    decisions = tmp_path / "d.csv"
    decisions.write_text(f"path,new_label\n{data / 'apple' / 'apple_000.jpg'},kiwi\n")
    assert main(["relabel", str(data), str(decisions), "--out", str(data / "inside")]) == 3
    assert "inside the data folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["relabel", str(data), str(decisions), "--out", str(tmp_path / "full")]) == 3
    assert "not empty" in capsys.readouterr().err
    decisions.write_text("path,label\nx,y\n")
    assert main(["relabel", str(data), str(decisions), "--manifest", str(tmp_path / "m.csv")]) == 3
    assert "new_label" in capsys.readouterr().err


def test_label_audit_bad_input(tmp_path, capsys):
    from fruitlens.data.check import check
    from fruitlens.data.scan import scan
    from fruitlens.errors import DataError
    from fruitlens.pipelines.audit import audit_data

    one = make_tree(tmp_path / "one", per_class=4, classes=("apple",), size=40)
    with pytest.raises(DataError, match="at least two classes"):
        audit_data(check(scan(one)), tmp_path / "out")
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = make_tree(tmp_path / "d", per_class=6, classes=("apple", "kiwi"), size=48)
    (data / "plum").mkdir()
    shutil.copy(data / "apple" / "apple_000.jpg", data / "plum" / "only.jpg")  # a one-image class
    (data / "kiwi" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    audit = audit_data(check(scan(data)), tmp_path / "out2", folds=3)
    assert audit.images == 13 and audit.audited < audit.images  # the broken file is left out, plum not audited
    assert any("without an out-of-sample prediction" in n for n in audit.notes)


def test_train_audits_its_own_labels(tmp_path, capsys):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = make_tree(tmp_path / "photos", per_class=60, classes=("apple", "kiwi", "lemon"), size=64)
    for i in range(3):
        shutil.move(str(data / "lemon" / f"lemon_{i:03d}.jpg"), str(data / "kiwi" / f"planted_{i}.jpg"))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(data),
                "--out",
                str(run),
                "--img-size",
                "64",
                "--workers",
                "0",
                "--target-acc",
                "0",
                "--group",
                "none",
                "--epochs",
                "80",
            ]
        )
        == 0
    )
    assert "look mislabelled" in capsys.readouterr().out
    rows = list(csv.DictReader((run / "label_issues.csv").open()))
    flagged = [r["path"].rsplit("/", 1)[-1] for r in rows]
    planted = {f"planted_{i}.jpg" for i in range(3)}
    assert set(flagged[: len(planted & set(flagged))]) <= planted and planted & set(flagged)  # most suspect first
    assert all(r["split"] in ("train", "val") and r["new_label"] == "" for r in rows)
    note = json.loads((run / "report.json").read_text())["label_audit"]
    assert note["train"] + note["val"] == len(rows) and note["html"] == "label_issues.html"
    assert 'id="label-audit"' in (run / "report.html").read_text()
    assert len(rows) <= 4  # the planted three first, no more than one clean image accused
    planted_in_test = [t for t in note["test"] if "planted" in t["path"]]
    assert all(t["suggested"] == "lemon" for t in planted_in_test)


def test_the_runs_audit_thresholds_are_on_the_calibrated_scale(tmp_path):
    # evaluate applies the audit's thresholds to the calibrated (temperature-folded) test predictions: the audit must
    # set them on held-out probabilities that carry the same temperature
    from fruitlens.data.manifest import Manifest, Record
    from fruitlens.evaluation.trust import HeldOut
    from fruitlens.pipelines.train import _audit_labels
    from fruitlens.rundir import RunDir

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    logits = rng.normal(0, 1, (60, 3)) + 4 * np.eye(3)[y]
    records = tuple(Record(f"/d/{'abc'[c]}/{i}.jpg", "abc"[c], "train" if i % 4 else "val") for i, c in enumerate(y))
    manifest = Manifest(records)
    order = [i for s in ("train", "val") for i, r in enumerate(records) if r.split == s]  # train rows, then val
    held = HeldOut(logits[order], y[order], np.ones(60, bool))
    audit = _audit_labels(RunDir(tmp_path / "run"), manifest, list("abc"), held, temperature=2.0)
    z = logits[order] / 2.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = thresholds(p, y[order])
    assert [audit.thresholds[c] for c in "abc"] == pytest.approx(expected.tolist())
