import json

import numpy as np
from PIL import Image

from fruitlens.cli.main import main
from fruitlens.data.check import check
from fruitlens.data.hashing import near_duplicate_pairs, popcount64
from fruitlens.data.scan import scan
from conftest import fruit_image, make_tree, tree_state


def _bad_tree(tmp_path):
    root = make_tree(tmp_path / "d", per_class=8, splits=("train", "test"))
    good = (root / "train" / "apple" / "apple_000.jpg").read_bytes()
    (root / "train" / "apple" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "kiwi" / "zero.jpg").write_bytes(b"")
    (root / "train" / "kiwi" / "text.png").write_bytes(b"this is not a png")
    fruit_image("lemon", 99).convert("CMYK").save(root / "train" / "lemon" / "cmyk.jpg")
    rgba = fruit_image("lemon", 98).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "train" / "lemon" / "alpha.png")
    img = fruit_image("apple", 97)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(root / "train" / "apple" / "rotated.jpg", exif=exif)
    fruit_image("kiwi", 96, size=20).save(root / "train" / "kiwi" / "tiny.jpg")
    # the same image in train and test: a leak
    (root / "test" / "apple" / "copy.jpg").write_bytes(good)
    # the same image under two labels: a conflict
    (root / "train" / "kiwi" / "mislabelled.jpg").write_bytes((root / "train" / "lemon" / "lemon_001.jpg").read_bytes())
    return root


def test_check_finds_every_kind_of_problem(tmp_path):
    root = _bad_tree(tmp_path)
    before = tree_state(root)
    report = check(scan(root))
    codes = {(i.code, i.path.split("/")[-1]) for i in report.issues}
    assert ("truncated", "truncated.jpg") in codes
    assert ("empty-file", "zero.jpg") in codes
    assert ("unreadable", "text.png") in codes
    assert ("too-small", "tiny.jpg") in codes
    assert ("mode-converted", "cmyk.jpg") in codes and ("mode-converted", "alpha.png") in codes
    assert ("exif-rotated", "rotated.jpg") in codes
    assert ("label-conflict", "mislabelled.jpg") in codes or ("label-conflict", "lemon_001.jpg") in codes
    leaks = report.summary.leaks
    assert leaks["test<-train"]["images"] >= 1
    assert {i.severity for i in report.issues if i.code in ("truncated", "empty-file", "too-small")} == {"error"}
    assert report.summary.bad == 4
    assert tree_state(root) == before  # nothing moved, changed or deleted


def test_imbalance_and_tiny_class(tmp_path):
    root = make_tree(tmp_path / "d", per_class=12, classes=("apple", "kiwi"))
    for p in sorted((root / "kiwi").iterdir())[3:]:
        p.unlink()
    report = check(scan(root))
    codes = {i.code for i in report.issues}
    assert {"imbalance", "tiny-class"} <= codes
    assert report.summary.imbalance_ratio == 4.0


def test_cli_check_json_and_exit_status(tmp_path, capsys):
    root = _bad_tree(tmp_path)
    assert main(["check", str(root), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["errors"] >= 4
    clean = make_tree(tmp_path / "clean", per_class=6)
    assert main(["check", str(clean)]) == 0
    text = capsys.readouterr().out
    assert "0 error(s)" in text and "Nothing was changed" in text


def test_near_duplicate_search_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 400, dtype=np.uint64)
    near = base[:100] ^ (np.uint64(1) << rng.integers(0, 64, 100).astype(np.uint64))  # 1 bit away
    hashes = np.concatenate([base, near])
    got = {tuple(p) for p in near_duplicate_pairs(hashes, 4).tolist()}
    dist = popcount64(hashes[:, None] ^ hashes[None, :]).reshape(len(hashes), len(hashes))
    want = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if dist[i, j] <= 4}
    assert got == want and len(want) >= 100


def test_batched_phash_equals_imagehash():
    import imagehash

    from fruitlens.data.hashing import phash_batch, phash_thumbnail

    rng = np.random.default_rng(1)
    images = [fruit_image(c, i, 60) for c in ("apple", "kiwi") for i in range(4)]
    images += [Image.fromarray(rng.integers(0, 256, (41, 77, 3), dtype=np.uint8)), Image.new("RGB", (50, 50), "white")]
    got = phash_batch([phash_thumbnail(im) for im in images]).tolist()
    assert got == [int(str(imagehash.phash(im)), 16) for im in images]


def test_reencoded_brighter_copy_under_another_label_is_a_conflict(tmp_path):
    """The colour check that rejects different round fruit must still accept a re-saved, slightly brighter copy."""
    from PIL import ImageEnhance

    root = make_tree(tmp_path / "d", per_class=6, size=96)
    original = Image.open(root / "apple" / "apple_002.jpg")
    ImageEnhance.Brightness(original).enhance(1.08).save(root / "kiwi" / "resaved.jpg", quality=70)
    report = check(scan(root))
    conflicts = {i.path.split("/")[-1] for i in report.issues if i.code == "label-conflict"}
    assert conflicts & {"resaved.jpg", "apple_002.jpg"}


def test_a_class_of_bad_files_a_broken_link_and_classes_a_level_down_are_named(tmp_path, capsys):
    data = make_tree(tmp_path / "d", per_class=6, classes=("apple", "kiwi"))
    (data / "plum").mkdir()
    (data / "plum" / "a.jpg").write_bytes(b"")  # every image of the class is bad
    (data / "apple" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a link to a file that was moved
    report = check(scan(data))
    codes = {(i.code, i.path) for i in report.issues}
    assert ("no-usable-image", "plum") in codes  # the class is named, not silently dropped
    assert any(i.code == "unreadable" and i.path.endswith("gone.jpg") for i in report.issues)  # listed, not skipped
    assert main(["check", str(data)]) == 1
    bad = tmp_path / "all-bad"
    for label in ("apple", "kiwi"):
        (bad / label).mkdir(parents=True)
        (bad / label / "a.jpg").write_bytes(b"")
    assert main(["check", str(bad)]) == 1
    assert "nan" not in capsys.readouterr().out  # no imbalance ratio of no classes
    deep = make_tree(tmp_path / "deep" / "photos" / "2024", per_class=6, classes=("apple", "kiwi"))
    issue = next(i for i in check(scan(tmp_path / "deep")).issues if i.code == "one-class")
    assert "sub-folders apple, kiwi" in issue.message and issue.message.endswith(str(deep))
