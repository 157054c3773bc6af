"""A few labelled photos of the user's setting (issue 33): which photos to label, and what they buy.

Fruits-360 (studio shots) is the data; GroceryStore's supermarket photos are the user's setting. ``grocery/train``
is the unlabeled pool; the photos picked from it are labelled from their folder names as a person would (a Granny
Smith gets Fruits-360's "Apple Granny Smith", a pear "Pear", a melon of any kind the new class "Melon", a banana the
new class "Banana", ...). A model is right when its answer is of the photo's kind (19 kinds: GroceryStore's coarse
classes), on
- ``grocery/val`` (111 photos taken apart from train), the pool being all of ``grocery/train`` (4 seeds), and
- cross-validation over train + val (5 folds of groups of similar photos, 2 seeds), the pool being the other folds.

``python benchmarks/bench_labels.py`` (about 25 min on 2 cores; features cached in benchmarks/out) measures, on
the features fruitlens's default computes for Fruits-360 (frozen MobileNetV2 at 224 px, block 17; the train split's
clean view and 3 augmented views) and for the photos (clean view and 8 augmented views), with fruitlens's own
functions (``labelling.select.pick_photos``, ``training.photos.fit_with_photos``, ``training.adapt.confident``):
budgets 18, 36, 90 and 180 photos, suggested against random; studio shots + photos against photos alone; the photos'
share of the weight; with and without pseudo-labels on the unlabeled rest of the pool (``--adapt-to``); the time.

``python benchmarks/bench_labels.py cli`` runs the loop a user runs, command by command (about 20 min): ``fruitlens
train`` on Fruits-360, ``fruitlens suggest`` on grocery/train (budget 90), the labels filled in, ``fruitlens train
--add``, ``fruitlens evaluate`` on grocery/val by kind; and the reverse: a GroceryStore model, 30 suggested
Fruits-360 frames added, scored on Fruits-360's Test frames of the kinds both have.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _measure import (
    FRUITLENS,
    OUT,
    ROOT,
    SHARED,
    SMOKE,
    SMOKE_DIR,
    SMOKE_SIZE,
    data_path,
    machine,
    pick,
    run,
    save,
    write_section,
)

sys.path.insert(0, str(ROOT / "src"))
from fruitlens.config import RRC_MIN_AREA, AugmentConfig, TrainConfig, apply_overrides  # noqa: E402
from fruitlens.data.dataset import ImageDataset  # noqa: E402
from fruitlens.data.manifest import Manifest, Record  # noqa: E402
from fruitlens.data.photos import near_copy_groups, read_photos  # noqa: E402
from fruitlens.labelling.select import pick_photos  # noqa: E402
from fruitlens.models.registry import build_model  # noqa: E402
from fruitlens.pipelines.prepare import prepare  # noqa: E402
from fruitlens.runtime import limit_heap_growth  # noqa: E402
from fruitlens.training.adapt import confident  # noqa: E402
from fruitlens.training.features import Placement, Views, cached_features  # noqa: E402
from fruitlens.training.photos import fit_with_photos, similar_groups  # noqa: E402
from fruitlens.training.solver import fit_linear  # noqa: E402

SIZE, STUDIO_VIEWS, PHOTO_VIEWS = (64, 1, 2) if SMOKE else (224, 3, 8)
BUDGETS, BUDGET = ((6, 12), 12) if SMOKE else ((18, 36, 90, 180), 90)  # BUDGET: of the rows after the curve
# the command-line loop's suggest; under --smoke 36 of the 48 photos, because 'train --add' with under 5 labelled
# photos in every class stops with sklearn's "n_splits=... cannot be greater than the number of members in each class"
SUGGEST = 36 if SMOKE else 90
VAL_SEEDS, CV_SEEDS, FOLDS = pick((0, 1, 2, 3)), pick((0, 1)), 2 if SMOKE else 5
ROWS = OUT / "labels_rows.json"
SHARE, L2 = 0.3, 1e-3  # fruitlens's defaults: fit.photo_share, and the studio head's weight decay
CLASS_MAP = json.loads(data_path("grocery-from-fruits360.json").read_text())
APPLES = {
    "Golden-Delicious": "Apple Golden 1",
    "Granny-Smith": "Apple Granny Smith",
    "Red-Delicious": "Apple Red 1",
    "Pink-Lady": "Apple Red Yellow",
    "Royal-Gala": "Apple Red Yellow",
}
PEARS = {"Anjou", "Conference", "Kaiser"}
MELONS = {"Cantaloupe", "Galia-Melon", "Honeydew-Melon", "Watermelon"}


def person_label(fine: str) -> str:
    """The label a person gives a GroceryStore photo, picking a Fruits-360 class where one fits."""
    if fine in APPLES:
        return APPLES[fine]
    if fine in CLASS_MAP:
        return CLASS_MAP[fine] if isinstance(CLASS_MAP[fine], str) else CLASS_MAP[fine][0]
    return "Melon" if fine in MELONS else fine


def kind(fine: str) -> str:
    """GroceryStore's coarse class (19 fruit kinds); a Fruits-360 class name gives its own kind."""
    if fine.startswith("Apple") or fine in APPLES:
        return "Apple"
    return (
        "Pear" if fine in PEARS else "Melon" if fine in MELONS else {"Passion Fruit": "Passion-Fruit"}.get(fine, fine)
    )


def class_kind(label: str) -> str:
    """The kind a model class answers for (a Fruits-360 class or a label a person gave)."""
    return "Apple" if label.startswith("Apple") else {"Passion Fruit": "Passion-Fruit"}.get(label, label)


# --- features: fruitlens's own feature pass, cached in benchmarks/out ---


def _dataset(paths: list[str], labels: list[str], pre) -> ImageDataset:
    return ImageDataset(Manifest(tuple(Record(p, lab) for p, lab in zip(paths, labels))), sorted(set(labels)), pre)


def features() -> dict:
    path = OUT / f"labels_features_{SIZE}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if "studio_groups" not in saved:  # features cached before the reverse direction was measured
            split = prepare(apply_overrides(TrainConfig(), {"data.path": str(data_path("fruits360"))}).validated())
            train = [r for r in split.manifest.records if r.split in ("train", "covered")]
            saved["studio_groups"] = np.unique([r.group for r in train], return_inverse=True)[1]
            torch.save(saved, path)
        return saved
    limit_heap_growth()
    t0 = time.perf_counter()
    net = build_model("mobilenet_v2", 2, img_size=SIZE, feature_layer="mid")
    pre = net.preprocessing
    # every training frame (data.keep_share=1): the photos' weight is a share of the studio rows, whatever their number
    overrides = {"data.path": str(data_path("fruits360")), "data.keep_share": 1}
    split = prepare(apply_overrides(TrainConfig(), overrides).validated())
    parts = split.manifest.by_split()
    studio = {s: ([str(parts[s].resolve(r)) for r in parts[s]], [r.label for r in parts[s]]) for s in ("train", "val")}
    datasets = {s: _dataset(*studio[s], pre) for s in studio}
    feats, _ = cached_features(
        net.backbone, pre, datasets, Views(STUDIO_VIEWS, AugmentConfig(crop_scale=0.6), 0), place=Placement(workers=1)
    )
    photo_paths = sorted(str(p) for p in data_path("grocery").rglob("*.jpg"))
    fine = [Path(p).parent.name for p in photo_paths]
    pf, _ = cached_features(
        net.backbone,
        pre,
        {"photos": _dataset(photo_paths, fine, pre)},
        Views(PHOTO_VIEWS, AugmentConfig(crop_scale=RRC_MIN_AREA), 1, ("photos",)),
        place=Placement(workers=1),
    )
    near = near_copy_groups(read_photos(photo_paths, what="bench").files)
    classes = sorted(set(studio["train"][1]))
    studio_groups = np.unique([r.group for r in parts["train"]], return_inverse=True)[1]
    out = {
        "studio_x": torch.cat([feats["train"][0], feats["train_aug"][0]]).half(),
        "studio_labels": [classes[i] for i in torch.cat([feats["train"][1], feats["train_aug"][1]]).tolist()],
        "photo_x": pf["photos"][0].half(),
        "photo_aug_x": pf["photos_aug"][0].half(),
        "photo_aug_img": pf["photos_aug"][2],
        "paths": photo_paths,
        "fine": fine,
        "near": near,
        "split": [Path(p).parent.parent.name for p in photo_paths],
        "studio_groups": studio_groups,
        "seconds": time.perf_counter() - t0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


# --- one labelled set -> a head -> accuracy by kind ---


class Bench:
    def __init__(self, f: dict) -> None:
        self.f = f
        self.fine = np.array(f["fine"])
        self.kinds = np.array([kind(g) for g in self.fine])
        self.person = np.array([person_label(g) for g in self.fine])
        self.split = np.array(f["split"])
        self.studio_labels = np.array(f["studio_labels"])
        self.xs = f["studio_x"].float()
        self.px = f["photo_x"].float()
        self.pax, self.paimg = f["photo_aug_x"].float(), f["photo_aug_img"].numpy()
        y = {c: i for i, c in enumerate(sorted(set(self.fine)))}
        self.similar = similar_groups(f["near"], self.px, np.array([y[g] for g in self.fine]))

    def rows(self, picked: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        keep = np.isin(self.paimg, picked)
        return torch.cat([self.px[picked], self.pax[torch.from_numpy(keep)]]), np.r_[
            self.person[picked], self.person[self.paimg[keep]]
        ]

    def head(self, picked: np.ndarray, studio: bool = True, share: float = SHARE, extra=None):
        """(the fitted head, its classes). ``extra``: (features, labels) of pseudo-labelled photos (studio side)."""
        px, py = self.rows(picked)
        sx, sy = (self.xs, self.studio_labels) if studio else (self.xs[:0], self.studio_labels[:0])
        if extra is not None:
            sx, sy = torch.cat([sx, extra[0]]), np.r_[sy, extra[1]]
        classes = sorted(set(sy.tolist()) | set(py.tolist()))
        index = {c: i for i, c in enumerate(classes)}
        ys, yp = torch.tensor([index[c] for c in sy], dtype=torch.long), torch.tensor([index[c] for c in py])
        both = torch.cat([sx, px])
        stats = (both.mean(0), both.std(0) + 1e-3)
        if not len(sx) or share is None:  # photos alone, or each photo row counted as one image
            return fit_linear(both, torch.cat([ys, yp]), len(classes), l2=L2, stats=stats), classes
        return fit_with_photos((sx, ys), (px, yp), len(classes), share, L2, stats), classes

    def score(self, head, classes: list[str], test: np.ndarray) -> tuple[float, float]:
        with torch.inference_mode():
            pred = head(self.px[test]).argmax(1).numpy()
        right = np.array([class_kind(classes[p]) == k for p, k in zip(pred, self.kinds[test])])
        return float(right.mean()), float(
            np.mean([right[self.kinds[test] == k].mean() for k in np.unique(self.kinds[test])])
        )

    def pick(self, pool: np.ndarray, budget: int, how: str, seed: int) -> np.ndarray:
        if how == "all":
            return pool
        if how.startswith("two rounds"):  # half typical, then the rest with the first half labelled
            first = self.pick(pool, budget // 2, "suggested", seed)
            rest = np.setdiff1d(pool, first)
            if how == "two rounds, random":
                return np.r_[first, np.random.default_rng(seed).choice(rest, budget - len(first), replace=False)]
            head, classes = self.head(first)
            with torch.inference_mode():
                probs = torch.softmax(head(self.px[rest]), 1).numpy()
            top2 = np.sort(probs, 1)[:, -2:]
            share = 0.0 if how == "two rounds, typical" else 0.3
            picks = pick_photos(
                self.px[rest].numpy(),
                budget - len(first),
                groups=np.asarray(self.f["near"])[rest],
                margins=top2[:, 1] - top2[:, 0],
                labelled=self.px[first].numpy(),
                uncertain_share=share,
                seed=seed,
            )
            return np.r_[first, rest[[p.index for p in picks]]]
        if how == "random":
            return np.random.default_rng(seed).choice(pool, budget, replace=False)
        picks = pick_photos(self.px[pool].numpy(), budget, groups=np.asarray(self.f["near"])[pool], seed=seed)
        return pool[[p.index for p in picks]]

    def adapt(self, head, classes: list[str], pool: np.ndarray, picked: np.ndarray):
        """``--adapt-to``: the unlabeled rest of the pool, class-balanced pseudo-labels (2 rounds, 20% then 40%)."""
        rest = np.setdiff1d(pool, picked)

        class Module(torch.nn.Module):
            def __init__(self, h):
                super().__init__()
                self.h = h

            def forward(self, x):
                return self.h(x)

        extra = None
        for share in (0.2, 0.4):
            idx, lab = confident(Module(head), self.px[rest], share)
            extra = (self.px[rest][idx], np.array([classes[i] for i in lab.tolist()]))
            head, classes = self.head(picked, extra=extra)
        return head, classes

    def case(
        self,
        train_pool: np.ndarray,
        test: np.ndarray,
        budget: int,
        how: str,
        seed: int,
        studio: bool = True,
        adapt: bool = False,
        share: float = SHARE,
    ) -> tuple[float, float]:
        picked = self.pick(train_pool, budget, how, seed) if budget else np.zeros(0, dtype=int)
        head, classes = self.head(picked, studio, share)
        if adapt:
            head, classes = self.adapt(head, classes, train_pool, picked)
        return self.score(head, classes, test)

    def measure(self, name: str, **kw) -> dict:
        from sklearn.model_selection import StratifiedGroupKFold

        done = json.loads(ROWS.read_text()) if ROWS.is_file() else {}
        if name in done:  # measured by an earlier invocation (delete benchmarks/out/labels_rows.json to redo)
            return done[name]
        t0 = time.perf_counter()
        train, val = np.flatnonzero(self.split == "train"), np.flatnonzero(self.split == "val")
        on_val = [self.case(train, val, seed=s, **kw) for s in VAL_SEEDS]
        on_cv = []
        for s in CV_SEEDS:
            folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=s)
            for tr, te in folds.split(np.zeros(len(self.kinds)), self.kinds, self.similar):
                on_cv.append(self.case(tr, te, seed=s, **kw))
        row = {
            "name": name,
            **{k: v for k, v in kw.items()},
            "val_accuracy": float(np.mean([a for a, _ in on_val])),
            "val_balanced": float(np.mean([b for _, b in on_val])),
            "cv_accuracy": float(np.mean([a for a, _ in on_cv])),
            "cv_balanced": float(np.mean([b for _, b in on_cv])),
            "seconds_per_case": round((time.perf_counter() - t0) / (len(on_val) + len(on_cv)), 2),
        }
        print(json.dumps(row), flush=True)
        ROWS.write_text(json.dumps({**done, name: row}, indent=1))
        return row


def curves() -> dict:
    t0 = time.perf_counter()
    f = features()
    b = Bench(f)
    rows = [b.measure("the data alone (no photo labelled)", budget=0, how="random")]
    for budget in BUDGETS:
        rows.append(b.measure(f"{budget} random photos", budget=budget, how="random"))
        rows.append(b.measure(f"{budget} suggested photos", budget=budget, how="suggested"))
    rows.append(
        b.measure(f"{BUDGET} suggested photos alone (no studio shots)", budget=BUDGET, how="suggested", studio=False)
    )
    rows.append(
        b.measure(
            f"{BUDGET} suggested, photos as one image each (no weighting)", budget=BUDGET, how="suggested", share=None
        )
    )
    rows.append(
        b.measure(f"{BUDGET} suggested, photos at 50% of the weight", budget=BUDGET, how="suggested", share=0.5)
    )
    rows.append(
        b.measure(f"{BUDGET} suggested + --adapt-to the rest of the pool", budget=BUDGET, how="suggested", adapt=True)
    )
    rows.append(b.measure("all photos of the pool labelled", budget=1, how="all"))
    for how in ("two rounds, typical", "two rounds, with unsure", "two rounds, random"):
        rows.append(
            b.measure(
                f"{BUDGET // 2} suggested, then {BUDGET - BUDGET // 2} more ({how.split(', ')[1]}) with the first "
                f"{BUDGET // 2} labelled",
                budget=BUDGET,
                how=how,
            )
        )
    reverse = Reverse(f).rows()
    return {
        "machine": machine(),
        "feature_seconds": round(f["seconds"], 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "reverse": reverse,
    }


F360_TO_GROCERY = {
    "Apple Braeburn": "Royal-Gala",
    "Apple Golden 1": "Golden-Delicious",
    "Apple Granny Smith": "Granny-Smith",
    "Apple Red 1": "Red-Delicious",
    "Apple Red Yellow": "Pink-Lady",
    "Pear": "Conference",
    "Passion Fruit": "Passion-Fruit",
}


class Reverse:
    """The other direction: a model on GroceryStore's photos (train + val, clean + 8 views) and Fruits-360 as the new
    setting: frames of its train split are the pool (near copies count once), labelled as a person using the
    GroceryStore model would (a Golden 1 frame as Golden-Delicious; kinds GroceryStore lacks as their own names), and
    Fruits-360's Test frames score it by kind (2 seeds)."""

    def __init__(self, f: dict) -> None:
        self.f = f
        self.gx = torch.cat([f["photo_x"].float(), f["photo_aug_x"].float()])
        fine = np.array(f["fine"])
        self.gy = np.r_[fine, fine[f["photo_aug_img"].numpy()]]
        self.test_x, self.test_y = _f360_test()

    def label(self, f360_class: str) -> str:
        return F360_TO_GROCERY.get(f360_class, f360_class)

    def run(self, budget: int, how: str, seed: int) -> tuple[float, float]:
        studio, labels = self.f["studio_x"].float(), np.array(self.f["studio_labels"])
        n = len(self.f["studio_labels"]) // (1 + STUDIO_VIEWS)
        pool = np.arange(n)
        near = self.f["studio_groups"]
        if budget == 0:
            picked = np.zeros(0, dtype=int)
        elif how == "random":
            picked = np.random.default_rng(seed).choice(pool, budget, replace=False)
        else:
            picks = pick_photos(studio[:n].numpy(), budget, groups=near, seed=seed)
            picked = pool[[p.index for p in picks]]
        rows = np.flatnonzero(np.isin(np.arange(len(labels)) % n, picked))  # the picked frames' clean view and views
        xs, ys = self.gx, self.gy
        xp, yp = studio[torch.from_numpy(rows)], np.array([self.label(c) for c in labels[rows]])
        classes = sorted(set(ys.tolist()) | set(yp.tolist()))
        index = {c: i for i, c in enumerate(classes)}
        both = torch.cat([xs, xp]) if len(xp) else xs
        stats = (both.mean(0), both.std(0) + 1e-3)
        yy = torch.tensor([index[c] for c in ys])
        head = (
            fit_with_photos((xs, yy), (xp, torch.tensor([index[c] for c in yp])), len(classes), SHARE, L2, stats)
            if len(xp)
            else fit_linear(xs, yy, len(classes), l2=L2, stats=stats)
        )
        with torch.inference_mode():
            pred = head(self.test_x).argmax(1).numpy()
        truth = np.array([kind_of_f360(c) for c in self.test_y])
        right = np.array([kind(classes[p]) == k for p, k in zip(pred, truth)])
        return float(right.mean()), float(np.mean([right[truth == k].mean() for k in np.unique(truth)]))

    def rows(self) -> list[dict]:
        out = []
        for name, budget, how in (
            ("the GroceryStore model alone", 0, "random"),
            ("30 random frames", 30, "random"),
            ("30 suggested frames", 30, "suggested"),
            ("90 suggested frames", 90, "suggested"),
        ):
            r = [self.run(budget, how, s) for s in (0, 1)]
            row = {
                "name": name,
                "accuracy": float(np.mean([a for a, _ in r])),
                "balanced": float(np.mean([b for _, b in r])),
            }
            print(json.dumps(row), flush=True)
            out.append(row)
        return out


def kind_of_f360(c: str) -> str:
    """The kind of a Fruits-360 class, in GroceryStore's kind names where it has one."""
    return class_kind(c)


def _f360_test() -> tuple[torch.Tensor, np.ndarray]:
    """Fruits-360 Test frames' clean features (block 17, 224 px), cached in benchmarks/out."""
    path = OUT / f"labels_f360_test_{SIZE}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        return saved["x"], saved["y"]
    net = build_model("mobilenet_v2", 2, img_size=SIZE, feature_layer="mid")
    files = sorted((data_path("fruits360") / "Test").rglob("*.jpg"))
    labels = [p.parent.name for p in files]
    feats, _ = cached_features(
        net.backbone,
        net.preprocessing,
        {"test": _dataset([str(p) for p in files], labels, net.preprocessing)},
        place=Placement(workers=1),
    )
    torch.save({"x": feats["test"][0].clone(), "y": np.array(labels)}, path)
    return feats["test"][0], np.array(labels)


def write(res: dict) -> None:
    lines = [
        "## A few labelled photos of your setting (issue 33)",
        "",
        f"`python benchmarks/bench_labels.py` ({res['machine']['date']}, {res['machine']['cores']} cores; "
        f"{res['seconds']:.0f} s). Fruits-360 (studio shots) + GroceryStore photos labelled as a person would; "
        "accuracy by fruit kind (19 kinds) on grocery/val (111 photos, pool grocery/train, 4 seeds) and by "
        "cross-validation over train + val (5 folds of groups of similar photos, 2 seeds). fruitlens's own "
        "selection, weighting and solver on its default features (224 px, block 17).",
        "",
        "| labelled photos | val accuracy | val balanced | CV accuracy | CV balanced | s per case |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['name']} | {100 * r['val_accuracy']:.1f}% | {100 * r['val_balanced']:.1f}% | "
            f"{100 * r['cv_accuracy']:.1f}% | {100 * r['cv_balanced']:.1f}% | {r['seconds_per_case']} |"
        )
    if res.get("reverse"):
        lines += [
            "",
            "The other direction: a model on GroceryStore's photos, Fruits-360 as the new setting (pool: the "
            "frames of its train split, near copies once; scored by kind on its Test frames, 2 seeds):",
            "",
            "| labelled frames | accuracy | balanced |",
            "|---|---|---|",
        ]
        lines += [f"| {r['name']} | {100 * r['accuracy']:.1f}% | {100 * r['balanced']:.1f}% |" for r in res["reverse"]]
    if res.get("cli"):
        lines += [
            "",
            "The loop a user runs (`python benchmarks/bench_labels.py cli`):",
            "",
            "| step | seconds | result |",
            "|---|---|---|",
        ]
        for step in res["cli"]:
            lines.append(f"| `{step['cmd']}` | {step['seconds']} | {step.get('result', '')} |")
    write_section("labels", "\n".join(lines))


# --- the loop a user runs, command by command ---


def _kind_map(model_classes: list[str], fine_classes: list[str]) -> dict[str, list[str]]:
    """For ``evaluate --class-map``: each GroceryStore folder -> the model classes of its kind. Folders of a kind the
    model has no class for are left out (evaluate counts their photos apart; a class map naming a class the model
    does not know is refused)."""
    kinds = {g: [c for c in model_classes if class_kind(c) == kind(g)] for g in fine_classes}
    return {g: classes for g, classes in kinds.items() if classes}


def _fill_labels(csv_in: Path, csv_out: Path, label_of) -> int:
    with csv_in.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["label"] = label_of(Path(r["path"]))
    with csv_out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def _accuracy(report: Path) -> str:
    rep = json.loads(report.read_text())
    m, t = rep["metrics"], rep.get("trust") or {}
    trust = (
        f"; unfamiliar {100 * t['unfamiliar']:.0f}%, not sure {100 * t['not_sure']:.0f}%"
        if t.get("unfamiliar") is not None
        else ""
    )
    return f"{100 * m['accuracy']:.1f}% (balanced {100 * m['balanced_accuracy']:.1f}%) on {m['n']} photos{trust}"


def cli() -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix="fruitlens-bench-labels-", dir=SMOKE_DIR))
    steps = []

    def step(args: list[str], result=None) -> dict:
        r = run(FRUITLENS + args, timeout=7200)
        if r["rc"]:
            raise SystemExit(f"{' '.join(args)} failed:\n{r['output'][-3000:]}")
        row = {
            "cmd": "fruitlens "
            + " ".join(a.replace(str(base) + "/", "").replace(str(SHARED), "../shared/data") for a in args),
            "seconds": r["seconds"],
            "peak_mib": r["peak_mib"],
        }
        if result:
            row["result"] = result()
        steps.append(row)
        print(json.dumps(row), flush=True)
        return row

    f360, grocery = data_path("fruits360"), data_path("grocery")
    step(["train", str(f360), "--out", str(base / "f360")] + SMOKE_SIZE)
    step(["suggest", str(base / "f360"), str(grocery / "train"), "--budget", str(SUGGEST), "--out", str(base / "pick")])
    labels = base / "labels.csv"
    _fill_labels(base / "pick" / "to-label.csv", labels, lambda p: person_label(p.parent.name))
    step(
        ["train", str(f360), "--add", str(labels), "--out", str(base / "mine")] + SMOKE_SIZE,
        lambda: json.loads((base / "mine" / "photos.json").read_text())["verdict"][:80],
    )
    classes = json.loads((base / "mine" / "labels.json").read_text())
    kmap = base / "kinds.json"
    kmap.write_text(json.dumps(_kind_map(classes, sorted(p.name for p in (grocery / "val").iterdir()))))
    step(
        ["evaluate", str(base / "mine"), str(grocery / "val"), "--class-map", str(kmap)],
        lambda: _accuracy(base / "mine" / "eval" / "grocery-val" / "report.json"),
    )
    base_map = base / "kinds0.json"
    base_map.write_text(
        json.dumps(
            _kind_map(
                json.loads((base / "f360" / "labels.json").read_text()),
                sorted(p.name for p in (grocery / "val").iterdir()),
            )
        )
    )
    step(
        ["evaluate", str(base / "f360"), str(grocery / "val"), "--class-map", str(base_map)],
        lambda: _accuracy(base / "f360" / "eval" / "grocery-val" / "report.json"),
    )
    return steps


def main() -> None:
    if sys.argv[1:] == ["cli"]:
        earlier = json.loads((OUT / "labels.json").read_text()) if (OUT / "labels.json").is_file() else {"rows": []}
        earlier["cli"] = cli()
        earlier.setdefault("machine", machine())
        earlier.setdefault("seconds", 0)
        save("labels", earlier)
        write(earlier)
        return
    res = curves()
    if (OUT / "labels.json").is_file():
        res["cli"] = json.loads((OUT / "labels.json").read_text()).get("cli")
    save("labels", res)
    write(res)


if __name__ == "__main__":
    main()
