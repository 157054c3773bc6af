"""``fruitlens check DATA --labels``: pretrained features of every usable image (cached under ``~/.cache/fruitlens``),
out-of-fold probabilities from k linear heads with folds of whole near-duplicate groups (a copy of an image cannot
vouch for its label), calibrated by a temperature, then the label audit's two findings
(``evaluation/label_audit.py``). ``fruitlens train`` runs the same on the held-out predictions it already has.
Nothing touches the images.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from fruitlens.data.check import CheckReport, duplicate_groups
from fruitlens.data.dataset import ImageDataset, make_loader
from fruitlens.errors import DataError
from fruitlens.evaluation.audit import neighbours_from_pairs
from fruitlens.evaluation.label_audit import LabelAudit, audit_heldout, write_audit
from fruitlens.evaluation.selective import fit_temperature
from fruitlens.evaluation.trust import choose_folds
from fruitlens.models.probs import softmax
from fruitlens.models.preprocessing import batch_for
from fruitlens.models.registry import build_model
from fruitlens.training.auto import auto_image_size
from fruitlens.training.engine import Engine
from fruitlens.training.store import FeatureStore
from fruitlens.training.heldout import HeadRecipe, out_of_fold_logits

log = logging.getLogger(__name__)

AUDIT_RECIPE = HeadRecipe(weight_decay=1e-4)  # a linear head on clean features, to convergence


def audit_data(
    report: CheckReport, out: Path, *, model: str = "mobilenet_v2", img_size: int = 0, folds: int = 5, seed: int = 0
) -> LabelAudit:
    """Audits the labels of every usable image of a check."""
    t0 = time.perf_counter()
    keep = [i for i, f in enumerate(report.files) if f.ok]
    records = [report.manifest.records[i] for i in keep]
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise DataError(
            f"the label audit needs at least two classes but found {len(classes)}",
            "add a folder per class: DATA/<class>/<images>",
        )
    sides = [min(report.files[i].width, report.files[i].height) for i in keep]
    size = img_size or auto_image_size(int(np.median(sides)))
    net = build_model(model, len(classes), weights="imagenet", img_size=size)  # WeightsError names the import
    paths = [str(report.manifest.resolve(r)) for r in records]
    x = _features(net, paths, classes, records, report.manifest.root)
    y = np.array([classes.index(r.label) for r in records])
    # folds of whole near-copy groups, so that a mislabelled image's copies under the same wrong label cannot vouch
    # for it; where a class is one long chain of copies (Fruits-360's turning fruit), finer groups
    name, groups, fold, held = choose_folds(
        y, [("near copies", duplicate_groups(report)[keep])], folds, seed, "label audit"
    )
    logits = out_of_fold_logits(x, torch.from_numpy(y), fold, len(classes), AUDIT_RECIPE)
    temperature = fit_temperature(logits[held], y[held])
    notes = [
        f"{len(np.unique(groups))} groups of {name} in {len(np.unique(fold))} folds; temperature {temperature:.2f}"
    ]
    position = {k: i for i, k in enumerate(keep)}
    pairs = [(position[a], position[b]) for a, b in report.near_pairs.tolist() if a in position and b in position]
    neighbours = neighbours_from_pairs(len(keep), np.array(pairs, dtype=np.int64))
    result = audit_heldout(
        paths, y, softmax(logits / temperature), held, classes, [r.split for r in records], neighbours, notes
    )
    result.method = (
        f"out-of-fold probabilities of {len(np.unique(fold))} linear heads on ImageNet {model} features "
        f"at {size} px, calibrated, and the labels of each image's near copies"
    )
    result.seconds = round(time.perf_counter() - t0, 2)
    write_audit(result, out, classes)
    return result


def _features(net, paths: list[str], classes: list[str], records, root: str) -> torch.Tensor:
    """Clean-view features from the data set's feature store, computing (and storing) the missing ones."""
    store = FeatureStore(net.name, "imagenet", net.preprocessing)
    x, missing = store.lookup(paths)
    if x is not None:
        log.info("label audit: features of %d images from %s", len(paths), store.path)
        return x
    from fruitlens.data.manifest import Manifest

    part = Manifest(tuple(records[i] for i in missing), root)
    pre = net.preprocessing
    engine = Engine(net.backbone, pre.image_size)
    dl = make_loader(ImageDataset(part, classes, pre), batch_size=batch_for(pre.image_size), shuffle=False, workers=1)
    t0 = time.perf_counter()
    feats = torch.cat([engine(pre.normalise(xb)) for xb, _ in dl])
    log.info("label audit: features of %d images in %.1fs (%s)", len(missing), time.perf_counter() - t0, engine.name)
    store.add([paths[i] for i in missing], feats)
    x, _ = store.lookup(paths)
    return x
