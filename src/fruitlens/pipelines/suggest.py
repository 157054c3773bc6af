"""``suggest``: which of the user's unlabeled photos to label, written as ``to-label.csv`` and ``label.html``.

find the photos -> decode them once (bad files listed) -> near-copy groups -> the run's model scores them (features,
calibrated top-k) -> ``labelling.select`` picks -> the CSV and the labelling page. Nothing is moved or changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fruitlens.data.manifest import Manifest
from fruitlens.data.photos import find_photos, near_copy_groups, read_photos
from fruitlens.errors import ConfigError, ImageError
from fruitlens.inference.predictor import Predictor
from fruitlens.models.probs import softmax
from fruitlens.labelling.labels import ToLabel, read_labels, read_to_label, write_to_label
from fruitlens.labelling.page import write_label_page
from fruitlens.labelling.select import pick_photos
from fruitlens.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class SuggestResult:
    """What ``suggest`` picked and wrote."""

    csv: Path
    page: Path
    picks: list[ToLabel] = field(default_factory=list)
    photos: int = 0  # photos that decode
    distinct: int = 0  # near-copy groups among them
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of files left out
    labelled: int = 0  # photos of the setting labelled already (the run's --add photos and --labelled)
    budget: int = 0
    seconds: float = 0.0

    @property
    def short(self) -> bool:
        """Fewer photos to pick from than the budget: every distinct photo was picked."""
        return len(self.picks) < self.budget


def suggest(
    run: str | Path,
    photos: str | Path,
    *,
    budget: int = 90,
    out: str | Path = "to-label",
    labelled: list[str | Path] | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> SuggestResult:
    """Picks ``budget`` photos of ``photos`` (a folder, searched to any depth, or a file listing paths) worth labelling
    for the model in ``run``; writes ``out/to-label.csv`` and ``out/label.html``. ``labelled``: labels CSVs of photos of
    the same setting labelled already (the run's own ``--add`` photos count too)."""
    if budget < 1:
        raise ConfigError(f"--budget must be at least 1 but received {budget}", "e.g. --budget 90")
    t0 = time.perf_counter()
    predictor = Predictor.load(run)
    known = _labelled_paths(run, labelled or [])
    candidates = [p for p in find_photos(photos, "suggest") if str(Path(p).resolve()) not in known]
    if not candidates:
        raise ConfigError(
            f"suggest {photos}: every photo there is labelled already",
            "pass a folder of photos that are not in the labels CSVs yet",
        )
    found = read_photos(candidates, what="suggest")
    groups = near_copy_groups(found.files)
    feats, probs, usable = _score(predictor, found.paths, batch_size)
    skipped = list(found.skipped) + [
        (p, "cannot be decoded at the model's size") for p, ok in zip(found.paths, usable) if not ok
    ]
    keep = np.flatnonzero(usable)
    paths = [found.paths[i] for i in keep]
    lab_feats = _features_of(predictor, sorted(known), batch_size) if known else None
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.c_[np.zeros(len(probs)), probs]
    picks = pick_photos(
        feats, budget, groups=groups[keep], margins=top2[:, 1] - top2[:, 0], labelled=lab_feats, seed=seed
    )
    rows = [_row(paths[p.index], probs[p.index], predictor.classes, p.why, p.near_copies) for p in picks]
    out = Path(out)
    result = SuggestResult(
        write_to_label(rows, out / "to-label.csv"),
        out / "label.html",
        rows,
        len(paths),
        len(np.unique(groups[keep])),
        skipped,
        len(known),
        budget,
    )
    intro = (
        f"These {len(rows)} photos of {result.photos} were picked for {Path(run).name}: the most typical "
        "photo of each kind of photo in the folder first."
    )
    write_label_page(rows, predictor.classes, result.page, intro=intro)
    result.seconds = round(time.perf_counter() - t0, 2)
    log.info(
        "suggest: %d of %d photos (%d distinct) to label -> %s", len(rows), result.photos, result.distinct, result.csv
    )
    return result


def _labelled_paths(run: str | Path, labelled: list[str | Path]) -> set[str]:
    """Resolved paths of the photos of the setting that are labelled already: the run's --add photos and the CSVs."""
    known: set[str] = set()
    photos_csv = RunDir(Path(run)).photos
    if Path(run).is_dir() and photos_csv.is_file():
        known |= {str(p.resolve()) for p in Manifest.from_csv(photos_csv).paths()}
    if labelled:
        known |= {str(Path(p.path).resolve()) for p in read_labels(list(labelled)).photos}
    return known


def _score(predictor: Predictor, paths: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, calibrated probabilities, decoded mask) of every photo under the run's model."""
    feats, logits, ok = [], [], []
    for batch in predictor.outputs_many(paths, batch_size):
        for _, row in batch:
            ok.append(not isinstance(row, ImageError))
            if ok[-1]:
                feats.append(row["features"])
                logits.append(row["logits"])
    if not feats:
        raise ConfigError("suggest: none of the photos can be decoded", "run 'fruitlens check' on the folder")
    return np.stack(feats), softmax(np.stack(logits)), np.array(ok)


def _features_of(predictor: Predictor, paths: list[str], batch_size: int) -> np.ndarray | None:
    feats = [
        row["features"]
        for batch in predictor.outputs_many([p for p in paths if Path(p).is_file()], batch_size)
        for _, row in batch
        if not isinstance(row, ImageError)
    ]
    return np.stack(feats) if feats else None


def _row(path: str, probs: np.ndarray, classes: list[str], why: str, near_copies: int) -> ToLabel:
    order = np.argsort(-probs)[:3]
    top = tuple((classes[j], float(probs[j])) for j in order)
    return ToLabel(str(Path(path).resolve()), top[0][0], top[0][1], top, why, near_copies)


def rows_for_labelling(predictor: Predictor, source: str | Path, batch_size: int = 16) -> list[ToLabel]:
    """The photos of ``serve --label``: the rows of a to-label.csv (in its order), or every photo of a folder with
    the model's guesses (files that do not decode are left out and logged)."""
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        return [r for r in read_to_label(src) if Path(r.path).is_file()]
    found = read_photos(find_photos(src, "--label"), what="--label")
    rows = []
    for path, (_, row) in zip(
        found.paths, (item for batch in predictor.outputs_many(found.paths, batch_size) for item in batch)
    ):
        if not isinstance(row, ImageError):
            rows.append(_row(path, softmax(row["logits"][None])[0], predictor.classes, "", 0))
    if not rows:
        raise ConfigError(f"--label {source}: none of the photos can be decoded", "run 'fruitlens check' on it")
    return rows
