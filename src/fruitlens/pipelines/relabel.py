"""``fruitlens relabel``: the label audit's decisions applied to a data set, as a copy or a manifest (the originals
are never touched)."""

from __future__ import annotations

from pathlib import Path

from fruitlens.data.relabel import RelabelResult, apply_decisions, copy_tree, read_decisions
from fruitlens.data.scan import scan


def relabel(
    data: str | Path, decisions: str | Path, *, out: str | Path | None = None, manifest: str | Path | None = None
) -> RelabelResult:
    """Applies ``decisions`` (label_issues.csv with its new_label column filled in) to ``data``: copies the kept
    images under their new labels into ``out`` (with its manifest.csv), or writes ``manifest`` pointing at the
    originals."""
    data = Path(data)
    scanned = scan(data)
    result = apply_decisions(scanned.manifest, read_decisions(Path(decisions)))
    if out is not None:
        copy_tree(result, scanned.manifest, Path(out), data if data.is_dir() else data.parent)
        result.manifest.to_csv(Path(out) / "manifest.csv")
    else:
        result.manifest.to_csv(Path(manifest))
    return result
