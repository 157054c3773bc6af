"""``ServeSettings``: everything the service is told at start-up, in one object; worker processes get it through one
environment variable (``FRUITLENS_SERVE``, JSON), so the contract lives here and nowhere else."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from fruitlens.errors import ConfigError

ENV = "FRUITLENS_SERVE"


@dataclass(frozen=True)
class ServeSettings:
    """What ``fruitlens serve`` was asked for; the limits guard the service against hostile requests."""

    model: str = ""  # run folder or model.onnx
    top_k: int = 3
    threads: int = 0  # inference threads per worker, 0: all cores
    max_upload_mb: float = 10.0  # request body
    max_images: int = 64  # images in one request
    max_pixels: int = 40_000_000  # pixels of one image (a decompression-bomb guard): about 6,300 x 6,300
    max_batch: int = 32  # images in one model call; larger requests run in several
    unknown_threshold: float | str = "auto"  # "not sure" below this calibrated probability; auto: the run's
    feedback: str = ""  # folder for "wrong? pick the right fruit" answers (photos + labels.csv); empty: off
    feedback_max_photos: int = 10_000
    feedback_max_mb: float = 2048.0
    label: str = ""  # a folder of photos (or a to-label.csv) to label on /label; empty: off
    label_out: str = ""  # where /label's answers go (a to-label.csv for train --add)

    def validated(self) -> "ServeSettings":
        for name, low in (
            ("top_k", 1),
            ("threads", 0),
            ("max_images", 1),
            ("max_pixels", 1),
            ("max_batch", 1),
            ("feedback_max_photos", 1),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.unknown_threshold != "auto" and not 0 <= float(self.unknown_threshold) <= 1:
            raise ConfigError(
                f"--unknown-threshold must be auto or a probability in [0, 1], got {self.unknown_threshold}"
            )
        if self.max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb must be above 0, got {self.max_upload_mb:g}")
        if self.feedback_max_mb <= 0:
            raise ConfigError(f"--feedback-max-mb must be above 0, got {self.feedback_max_mb:g}")
        return self

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> "ServeSettings":
        try:
            raw = json.loads(os.environ[ENV])
        except KeyError:
            raise ConfigError(f"{ENV} is not set", "start the service with 'fruitlens serve MODEL'") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{ENV} is not valid JSON ({exc})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known}).validated()
