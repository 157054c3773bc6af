"""``check``: every image of DATA read once (findings, near duplicates, class balance) and, on request, its labels
audited with out-of-fold predictions of pretrained features. Reads files only; changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fruitlens.data.check import CheckReport, check
from fruitlens.data.scan import scan
from fruitlens.evaluation.label_audit import LabelAudit
from fruitlens.pipelines.audit import audit_data


@dataclass
class CheckResult:
    report: CheckReport
    audit: LabelAudit | None = None  # with labels=True

    @property
    def ok(self) -> bool:
        """No errors (warnings and label issues are for the user to look at)."""
        return not self.report.errors


def check_data(
    data: str | Path,
    *,
    labels: bool = False,
    audit_out: str | Path = "label_audit",
    min_size: int = 32,
    near_dup_distance: int = 4,
    img_size: int = 0,
    folds: int = 5,
    workers: int = 0,
) -> CheckResult:
    report = check(scan(data), min_size=min_size, near_dup_distance=near_dup_distance, workers=workers)
    audit = audit_data(report, Path(audit_out), img_size=img_size, folds=folds) if labels else None
    return CheckResult(report, audit)
