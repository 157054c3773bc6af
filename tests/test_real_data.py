"""On the real images under ../shared/data (skipped with a reason where absent; required under CI=true)."""

from collections import Counter

from fruitlens.data.check import check
from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import scan
from fruitlens.data.split import split
from conftest import shared_data


def test_fruits360_own_split_leaks_and_grouped_split_does_not():
    report = check(scan(shared_data("fruits360")))
    assert report.summary.images == 16861 and report.summary.classes == 27
    own = report.summary.leaks["test<-train"]
    assert own["share"] > 0.3  # Fruits-360's Test frames have near duplicates in Training
    # round fruit on white share perceptual hashes across classes (grapefruit/golden apple, orange/peach: 980
    # pairs with a 4x4 colour check); the 8x8 colour check tells them apart, so no label conflict is reported
    assert report.summary.label_conflicts == 0
    pooled = Manifest(tuple(r.__class__(r.path, r.label) for r in report.manifest), report.manifest.root)
    report.manifest = pooled
    res = split(report, val=0.15, test=0.15, seed=0)
    assert sum(v["images"] for v in res.leaks.values()) == 0
    totals = Counter(r.split for r in res.manifest)
    assert totals["test"] > 500 and totals["val"] > 500
    assert any("cannot be split without a leak" in w for w in res.warnings)


def test_grocery_train_val_layout():
    report = check(scan(shared_data("grocery")))
    assert report.summary.classes == 28 and report.summary.bad == 0
    res = split(report)
    totals = Counter(r.split for r in res.manifest)
    assert totals["test"] == 111  # the data's own val folder is held out as test
