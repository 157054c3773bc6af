"""The one config path: frozen dataclasses, YAML in and out, ``key=value`` overrides with did-you-mean.

A ``TrainConfig`` is built once (defaults <- YAML file <- CLI options <- ``key=value`` overrides), validated once,
and written to the run's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from fruitlens.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split."""

    path: str = ""
    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    group: str = "near-duplicates"  # near-duplicates | none | pattern
    group_pattern: str = ""
    near_dup_distance: int = 4
    min_size: int = 32
    cache_images: bool = False
    num_workers: int = -1  # -1: pick from the CPU count
    eval_data: str = ""  # another labelled folder (or manifest) the run is also evaluated on: RUN/eval/<name>/
    eval_class_map: str = ""  # JSON mapping eval_data's class names onto the training classes
    adapt_to: str = ""  # a folder of unlabeled photos of where the model will be used (training/adapt.py)
    add: tuple[str, ...] = ()  # labels CSVs (path,label) of photos of the user's setting: train --add
    keep_share: float = -1.0  # of each near-copy group of training images, trained on (data/prune.py); -1: auto


RRC_MIN_AREA = 0.08  # torchvision's RandomResizedCrop default: the smallest crop, as a share of the image area


@dataclass(frozen=True)
class AugmentConfig:
    """The original's ImageDataGenerator options, each switchable off (0 / false)."""

    enabled: bool = True
    rotation: float = 20.0  # degrees
    zoom: float = 0.15  # fraction
    shift: float = 0.1  # fraction of the image side
    hflip: bool = True
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; photos need it, studio shots don't mind
    random_crop: bool = True  # random resized crop: the lever for real photos
    crop_scale: float = 0.0  # smallest random crop, a fraction of the image area; 0: picked from the data

    @property
    def min_crop_area(self) -> float:
        """``crop_scale``, or torchvision's RandomResizedCrop default (0.08) where no data has picked one yet."""
        return self.crop_scale or RRC_MIN_AREA


@dataclass(frozen=True)
class ModelConfig:
    """Which network, which weights, which input size."""

    name: str = "mobilenet_v2"
    weights: str = "imagenet"  # imagenet | none | PATH to a state dict
    img_size: int = 0  # 0: pick from the data
    fast: bool = False  # small studio shots keep their own size (96 px) instead of 224: quicker, far worse on photos
    # auto | last | mid: the backbone's last layer, or an earlier block's features, standardised (auto: mid for a head
    # on cached features of studio shots upscaled for photos, training/auto.py: auto_feature_layer)
    feature_layer: str = "auto"
    dropout: float = 0.2


@dataclass(frozen=True)
class FitConfig:
    """How training runs (the original's Adam + callbacks)."""

    epochs: int = 0  # max epochs of the first phase; 0: picked by training/fit.py: auto_epochs
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = -1.0  # -1: picked from the data (auto.py: 1e-4; 1e-3 for studio shots upscaled)
    label_smoothing: float = 0.0
    balance: str = "none"  # none | weights | sampler
    feature_cache: bool = True
    feature_views: int = -1  # augmented views per image in the feature cache; -1: picked from the data (auto.py)
    fine_tune_blocks: int = 0
    fine_tune_epochs: int = 2
    fine_tune_lr: float = 1e-4
    early_stopping_patience: int = 5
    plateau_patience: int = 2
    plateau_factor: float = 0.2
    target_acc: float = -1.0  # the TargetAccuracy stop; 0: off; -1: picked from the data (auto.py: 0.98, off for
    # studio shots upscaled for photos)
    target_monitor: str = "val"  # val | train
    deterministic: bool = False
    precision: str = "auto"
    accelerator: str = "auto"
    devices: str = "1"
    num_nodes: int = 1
    strategy: str = "auto"
    limit_batches: float = 1.0  # for smoke tests: a fraction or a count of batches per epoch
    adapt_share: float = (
        0.4  # --adapt-to: share of each class's photos (surest first) pseudo-labelled in the last round
    )
    adapt_rounds: int = (
        2  # --adapt-to: score the photos, retrain the head; this many times (shares rise to adapt_share)
    )
    photo_share: float = 0.3  # --add: the share of the head's training weight that the labelled photos carry
    photo_views: int = 8  # --add: augmented views of each labelled photo in the feature cache


@dataclass(frozen=True)
class TrustConfig:
    """How the model learns to say "not sure" and "unfamiliar" (training/trust.py)."""

    target_precision: float = 0.95  # accuracy wanted of the answered images: sets the "not sure" threshold
    folds: int = 5  # out-of-fold heads for the held-out predictions
    groups: str = "visual"  # visual (near copies + feature clusters) | near-duplicates: what a fold keeps together
    images_per_group: int = 8  # size of the feature clusters of the visual groups


LOGGERS = ("csv", "tensorboard", "mlflow")


@dataclass(frozen=True)
class TrackConfig:
    """Where the run is logged: Lightning's own loggers (csv, tensorboard, mlflow), combinable."""

    loggers: str = "csv"  # comma-separated: csv, tensorboard, mlflow
    mlflow_uri: str = (
        ""  # e.g. sqlite:///runs/mlflow.db; empty: $MLFLOW_TRACKING_URI, else sqlite:///<run>/../mlflow.db
    )
    experiment: str = "fruitlens"

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.loggers.split(",") if n.strip()]


# the names of the train command's options (and of fruitlens.train's keyword arguments) -> config keys
OPTIONS = {
    "model": "model.name",
    "weights": "model.weights",
    "img_size": "model.img_size",
    "fast": "model.fast",
    "feature_layer": "model.feature_layer",
    "epochs": "fit.epochs",
    "batch_size": "fit.batch_size",
    "lr": "fit.lr",
    "balance": "fit.balance",
    "label_smoothing": "fit.label_smoothing",
    "target_acc": "fit.target_acc",
    "target_monitor": "fit.target_monitor",
    "feature_views": "fit.feature_views",
    "fine_tune_blocks": "fit.fine_tune_blocks",
    "fine_tune_epochs": "fit.fine_tune_epochs",
    "deterministic": "fit.deterministic",
    "devices": "fit.devices",
    "num_nodes": "fit.num_nodes",
    "strategy": "fit.strategy",
    "accelerator": "fit.accelerator",
    "precision": "fit.precision",
    "val": "data.val",
    "test": "data.test",
    "seed": "data.seed",
    "workers": "data.num_workers",
    "cache_images": "data.cache_images",
    "group": "data.group",
    "eval_data": "data.eval_data",
    "class_map": "data.eval_class_map",
    "adapt_to": "data.adapt_to",
    "add": "data.add",
    "keep_share": "data.keep_share",
    "feature_cache": "fit.feature_cache",
    "augment": "augment.enabled",
    "logger": "track.loggers",
    "mlflow_uri": "track.mlflow_uri",
    "experiment": "track.experiment",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``fruitlens train`` needs; written to the run's ``config.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        cfg = cls()
        flat = {
            f"{section}.{key}": value
            for section, values in (data or {}).items()
            for key, value in _section_items(section, values, source)
        }
        return apply_overrides(cfg, flat, source)

    @classmethod
    def from_yaml(cls, path: Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        return cls.from_dict(data, source=str(path)).validated()

    def validated(self) -> "TrainConfig":
        """Checks value ranges once; raises ConfigError naming the key."""
        d, f, m, a, t, k = self.data, self.fit, self.model, self.augment, self.trust, self.track
        checks = [
            (0 <= d.val < 1, "data.val", "a fraction in [0, 1)"),
            (0 <= d.test < 1, "data.test", "a fraction in [0, 1)"),
            (d.val + d.test < 1, "data.val + data.test", "below 1 so that training keeps images"),
            (d.group in ("near-duplicates", "none", "pattern"), "data.group", "near-duplicates, none or pattern"),
            (
                d.group != "pattern" or bool(d.group_pattern),
                "data.group_pattern",
                "a regular expression when data.group=pattern",
            ),
            (d.keep_share == -1 or 0 < d.keep_share <= 1, "data.keep_share", "-1 (auto) or a fraction in (0, 1]"),
            (f.epochs >= 0, "fit.epochs", "0 (auto) or more"),
            (f.batch_size >= 1, "fit.batch_size", ">= 1"),
            (f.lr > 0, "fit.lr", "> 0"),
            (f.target_acc == -1 or 0 <= f.target_acc <= 1, "fit.target_acc", "-1 (auto) or a fraction in [0, 1]"),
            (f.weight_decay == -1 or f.weight_decay >= 0, "fit.weight_decay", "-1 (auto) or >= 0"),
            (f.target_monitor in ("val", "train"), "fit.target_monitor", "val or train"),
            (f.balance in ("none", "weights", "sampler"), "fit.balance", "none, weights or sampler"),
            (f.feature_views >= -1, "fit.feature_views", "-1 (auto) or >= 0"),
            (f.fine_tune_blocks >= 0, "fit.fine_tune_blocks", ">= 0"),
            (0 < f.adapt_share <= 1, "fit.adapt_share", "a fraction in (0, 1]"),
            (f.adapt_rounds >= 1, "fit.adapt_rounds", ">= 1"),
            (0 < f.photo_share < 1, "fit.photo_share", "a fraction in (0, 1)"),
            (f.photo_views >= 0, "fit.photo_views", ">= 0"),
            (0 <= f.label_smoothing < 1, "fit.label_smoothing", "in [0, 1)"),
            (m.img_size == 0 or m.img_size >= 16, "model.img_size", "0 (auto) or >= 16"),
            (0 <= m.dropout < 1, "model.dropout", "in [0, 1)"),
            (m.feature_layer in ("auto", "last", "mid"), "model.feature_layer", "auto, last or mid"),
            (0 <= a.zoom < 1, "augment.zoom", "in [0, 1)"),
            (0 <= a.shift < 1, "augment.shift", "in [0, 1)"),
            (0 <= a.crop_scale <= 1, "augment.crop_scale", "0 (auto) or a fraction in (0, 1]"),
            (0 < t.target_precision <= 1, "trust.target_precision", "a fraction in (0, 1]"),
            (t.folds >= 2, "trust.folds", ">= 2"),
            (t.groups in ("visual", "near-duplicates"), "trust.groups", "visual or near-duplicates"),
            (t.images_per_group >= 1, "trust.images_per_group", ">= 1"),
            (
                bool(k.names) and all(n in LOGGERS for n in k.names),
                "track.loggers",
                f"a comma-separated list of {', '.join(LOGGERS)} (got '{k.loggers}')",
            ),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(
                    f"config value {key} is out of range: expected {expected}",
                    "fix the option or the key=value override",
                )
        return self


def _section_items(section: str, values: Any, source: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of key: value")
    return values.items()


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typing.get_origin(typ) is tuple:  # a list of paths: from YAML a list, from an option or override one or more
        items = value if isinstance(value, (list, tuple)) else [] if value in (None, "") else [value]
        return tuple(str(v) for v in items)
    if typ is bool or typ == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false but received '{value}'")
    try:
        if typ in (int, "int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ in (float, "float"):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: expected a number ({getattr(typ, '__name__', typ)}) but received '{value}'"
        ) from None
    return "" if value is None else str(value)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str = "override") -> TrainConfig:
    """Returns ``cfg`` with dotted ``section.key`` values replaced; unknown keys get did-you-mean."""
    sections = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    all_keys = [f"{s}.{f.name}" for s, obj in sections.items() for f in fields(obj)]
    for dotted, value in overrides.items():
        if dotted not in all_keys:
            # accept a bare key when it is unique (epochs=5 means fit.epochs=5)
            matches = [k for k in all_keys if k.split(".", 1)[1] == dotted]
            if len(matches) != 1:
                raise ConfigError(f"{source}: " + did_you_mean(dotted, all_keys, "config key"))
            dotted = matches[0]
        section, key = dotted.split(".", 1)
        obj = sections[section]
        hints = typing.get_type_hints(type(obj))
        sections[section] = replace(obj, **{key: _coerce(value, hints[key], dotted)})
    return replace(cfg, **sections)


def config_from(
    data: str | None = None,
    config_file: str | Path | None = None,
    options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """The train command's config (and ``fruitlens.train``'s): defaults <- ``config_file`` (YAML) <- ``options``
    (the command's option names, see OPTIONS) <- ``overrides`` (``section.key`` or a unique bare key); validated."""
    cfg = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
    values = {}
    for opt, value in (options or {}).items():
        if opt not in OPTIONS:
            raise ConfigError(
                did_you_mean(opt, list(OPTIONS), "option"),
                "or pass a config key as an override, e.g. overrides={'fit.epochs': 5}",
            )
        values[OPTIONS[opt]] = value
    if data:
        values["data.path"] = str(data)
    cfg = apply_overrides(cfg, values, "option")
    cfg = apply_overrides(cfg, dict(overrides or {}), "override")
    if not cfg.data.path:
        raise ConfigError("no DATA given", "fruitlens train DATA --out RUN_DIR (or --resume RUN_DIR)")
    return cfg.validated()


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["fit.epochs=5", "augment.hflip=false"]`` -> dict; a missing ``=`` is a ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value", "e.g. fit.epochs=5 or augment.rotation=0")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
