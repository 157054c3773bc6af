import csv
from collections import Counter

import numpy as np
import pytest

from fruitlens.cli.main import main
from fruitlens.data.check import check
from fruitlens.data.scan import scan
from fruitlens.data.split import split
from fruitlens.errors import ConfigError
from conftest import fruit_image, make_tree


def _with_frames(root, label, group, n):
    """``n`` copies of one image with tiny changes: near duplicates, like frames of one fruit turning."""
    base = fruit_image(label, 5000 + group, 64)
    for i in range(n):
        img = base.copy()
        img.putpixel((i % 64, 0), (250, 250, 250))
        img.save(root / label / f"{label}_g{group}_{i}.jpg", quality=95)


def test_stratified_reproducible_and_leak_free(tmp_path):
    root = make_tree(tmp_path / "d", per_class=20)
    for label in ("apple", "kiwi", "lemon"):
        _with_frames(root, label, 1, 6)
    report = check(scan(root))
    a = split(report, val=0.2, test=0.2, seed=1)
    b = split(report, val=0.2, test=0.2, seed=1)
    assert [(r.path, r.split) for r in a.manifest] == [(r.path, r.split) for r in b.manifest]
    for label, counts in a.table.items():
        assert counts["val"] >= 2 and counts["test"] >= 2 and counts["train"] >= 10
    groups = {}
    for r in a.manifest:
        groups.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in groups.values())  # no group crosses splits
    frames = [r for r in a.manifest if "_g1_" in r.path]
    assert len({r.group for r in frames if r.label == "apple"}) == 1
    assert not any(v["images"] for v in a.leaks.values())
    c = split(report, val=0.2, test=0.2, seed=2)
    assert [r.split for r in c.manifest] != [r.split for r in a.manifest]


def test_group_none_and_pattern(tmp_path):
    root = make_tree(tmp_path / "d", per_class=10)
    _with_frames(root, "apple", 1, 6)
    report = check(scan(root))
    none = split(report, group="none")
    assert len({r.group for r in none.manifest}) == len(none.manifest)
    pat = split(report, group="pattern", group_pattern=r"^(\w+?)_g?\d+")
    apple_groups = {r.group for r in pat.manifest if r.label == "apple"}
    assert len(apple_groups) < 16
    with pytest.raises(ConfigError, match="matches none of the .* file names"):  # a typo would silently group nothing
        split(report, group="pattern", group_pattern=r"^frame-(\d+)$")


def test_tiny_class_gets_warning_not_crash(tmp_path):
    root = make_tree(tmp_path / "d", per_class=10, classes=("apple", "kiwi"))
    (root / "plum").mkdir()
    fruit_image("plum", 1).save(root / "plum" / "only.jpg")
    res = split(check(scan(root)))
    assert any("'plum' has only 1 image" in w for w in res.warnings)
    assert res.table["plum"]["train"] == 1


def test_existing_split_is_kept_and_val_carved_from_train(tmp_path):
    root = make_tree(tmp_path / "d", per_class=12, splits=("Training", "Test"))
    res = split(check(scan(root)), val=0.25)
    totals = Counter(r.split for r in res.manifest)
    assert totals["test"] == 36 and totals["val"] > 0 and totals["train"] + totals["val"] == 36
    assert res.kept_existing


def test_train_val_data_holds_val_out_as_test(tmp_path):
    root = make_tree(tmp_path / "d", per_class=12, splits=("train", "val"))
    res = split(check(scan(root)), val=0.2)
    totals = Counter(r.split for r in res.manifest)
    assert totals["test"] == 36 and totals["val"] > 0
    assert any("held out as the test split" in n for n in res.notes)


def test_corrupt_files_are_left_out_and_listed(tmp_path, capsys):
    root = make_tree(tmp_path / "d", per_class=10)
    (root / "kiwi" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    out = tmp_path / "m.csv"
    assert main(["split", str(root), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "broken.jpg" in text and "left out 1 unusable" in text
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 30 and not any(r["path"].endswith("broken.jpg") for r in rows)
    assert set(rows[0]) == {"path", "label", "split", "group", "hash"}


def test_bad_fractions(tmp_path):
    from fruitlens.errors import ConfigError

    root = make_tree(tmp_path / "d", per_class=4)
    with pytest.raises(ConfigError):
        split(check(scan(root)), val=0.6, test=0.5)


def test_split_replaces_its_own_manifest_but_never_another_file(tmp_path, capsys):
    root = make_tree(tmp_path / "d", per_class=10, classes=("apple", "kiwi"))
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,table\n1,2,3\n")
    assert main(["split", str(root), "--out", str(notes)]) == 2
    assert "is not a fruitlens manifest" in capsys.readouterr().err and notes.read_text() == "my,own,table\n1,2,3\n"
    out = tmp_path / "manifest.csv"
    assert main(["split", str(root), "--out", str(out)]) == 0
    assert main(["split", str(root), "--out", str(out), "--seed", "1"]) == 0  # a rerun replaces its own manifest
    assert out.read_text().startswith("path,label,split,group,hash")


def test_near_copies_train_through_representatives_that_cover_each_group(tmp_path):
    """Frames of one fruit turning: each group keeps a share of its frames, picked to cover it (k-center on the
    perceptual hashes), the rest move to split 'covered'; a group of one and the test split stay as they are."""
    from fruitlens.data.check import FileInfo
    from fruitlens.data.manifest import Manifest, Record
    from fruitlens.data.prune import COVERED, auto_keep_share, cover, representatives

    # a chain of hashes: frame i differs from frame 0 in its first i bits, so the ends are far apart
    chain = np.array([(1 << i) - 1 for i in range(20)], dtype=np.uint64)
    picked = cover(chain, 4)
    assert len(picked) == 4 and {0, 19} <= set(picked.tolist())  # the extremes cover a chain
    gaps = np.diff(np.sort(picked))
    assert gaps.max() <= 10  # spread along it, not bunched
    records = [Record(f"/d/apple/{i}.jpg", "apple", "train", "g1") for i in range(20)]
    records += [Record("/d/kiwi/0.jpg", "kiwi", "train", "g2"), Record("/d/kiwi/t.jpg", "kiwi", "test", "g3")]
    files = {r.path: FileInfo(True, phash=int(chain[i % 20])) for i, r in enumerate(records)}
    pruned, moved = representatives(Manifest(tuple(records)), files, 0.2)
    splits = [r.split for r in pruned]
    assert moved == 16 and splits[:20].count("train") == 4 and splits[:20].count(COVERED) == 16
    assert splits[20:] == ["train", "test"]
    assert representatives(Manifest(tuple(records)), files, 1.0)[1] == 0
    assert auto_keep_share(490) < 1 and auto_keep_share(1) == 1.0
