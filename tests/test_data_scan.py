import pytest

from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import scan
from fruitlens.errors import DataError
from conftest import make_tree


def test_class_folders(fruit_tree):
    res = scan(fruit_tree)
    assert res.layout == "classes"
    assert res.manifest.classes == ["apple", "kiwi", "lemon"]
    assert len(res.manifest) == 36 and {r.split for r in res.manifest} == {""}


def test_split_folders_any_case(tmp_path):
    make_tree(tmp_path / "d", per_class=3, splits=("Training", "VALIDATION", "test"))
    res = scan(tmp_path / "d")
    assert res.layout == "splits"
    assert set(res.manifest.counts()) == {"train", "val", "test"}


def test_hidden_non_image_and_uppercase_extensions(fruit_tree):
    (fruit_tree / "apple" / ".DS_Store").write_bytes(b"x")
    (fruit_tree / "apple" / "notes.txt").write_text("hi")
    (fruit_tree / "apple" / "apple_000.jpg").rename(fruit_tree / "apple" / "BIG.JPEG")
    (fruit_tree / ".hidden_class").mkdir()
    (fruit_tree / "empty").mkdir()
    res = scan(fruit_tree)
    assert any(p.endswith(".DS_Store") for p in res.skipped_hidden)
    assert any(p.endswith("notes.txt") for p in res.skipped_non_image)
    assert any(r.path.endswith("BIG.JPEG") for r in res.manifest)
    assert res.empty_classes == ["empty"]


def test_manifest_csv_round_trip(fruit_tree, tmp_path):
    m = scan(fruit_tree).manifest
    m.to_csv(tmp_path / "m.csv")
    back = Manifest.from_csv(tmp_path / "m.csv")
    assert back.classes == m.classes and len(back) == len(m)
    assert scan(tmp_path / "m.csv").layout == "csv"


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        scan(tmp_path / "empty")
    (tmp_path / "bad.csv").write_text("file,class\na,b\n")
    with pytest.raises(DataError, match="lacks column"):
        scan(tmp_path / "bad.csv")
