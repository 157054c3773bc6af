"""``fruitlens check`` and ``fruitlens split``."""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from fruitlens.cli.output import print_json, table
from fruitlens.data.check import CheckReport
from fruitlens.errors import ExitCode
from fruitlens.jsonio import json_safe

CHECK_EXAMPLES = """examples:
  fruitlens check photos/                     # class folders, or train/ val/ test/ folders
  fruitlens check ../shared/data/fruits360 --json > check.json
  fruitlens check manifest.csv --min-size 64
  fruitlens check photos/ --labels            # + which images look mislabelled -> label_audit/label_issues.html
"""

RELABEL_EXAMPLES = """examples:
  fruitlens relabel photos/ label_audit/label_issues.csv --out photos_fixed/     # a corrected copy
  fruitlens relabel photos/ label_audit/label_issues.csv --manifest fixed.csv    # no copy: a manifest to train on
  fruitlens train fixed.csv --out runs/fixed
"""

SPLIT_EXAMPLES = """examples:
  fruitlens split photos/ --val 0.15 --test 0.15 --seed 0 --out manifest.csv
  fruitlens split photos/ --group none                      # plain stratified split
  fruitlens split photos/ --group-pattern '^(.*)_\\d+\\.jpg$' # frames named kiwi12_003.jpg grouped by 'kiwi12'
"""


def add_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="is this data set usable? bad files, imbalance, duplicates, leaks",
        epilog=CHECK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="folder of class folders, folder of split folders, or manifest CSV")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--min-size", type=int, default=32, help="smallest usable image side in px (default 32)")
    p.add_argument("--near-dup-distance", type=int, default=4, help="perceptual-hash bits that may differ (default 4)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per CPU)")
    p.add_argument("--show", type=int, default=5, help="files listed per finding (default 5; --json lists all)")
    g = p.add_argument_group("label audit")
    g.add_argument(
        "--labels",
        action="store_true",
        help="also find images that look mislabelled (confident learning "
        "on out-of-fold predictions of pretrained features)",
    )
    g.add_argument("--audit-out", default="label_audit", help="folder for label_issues.html/.csv (default label_audit)")
    g.add_argument("--folds", type=int, default=5, help="out-of-fold heads (default 5)")
    g.add_argument("--img-size", type=int, default=0, help="input size of the features (default: from the data)")
    p.set_defaults(func=run_check)


def add_relabel(sub) -> None:
    p = sub.add_parser(
        "relabel",
        help="apply the decisions of label_issues.csv to a copy or a manifest",
        epilog=RELABEL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="the data folder (or manifest CSV) that was audited")
    p.add_argument("decisions", help="label_issues.csv with its new_label column filled in (a class name, or drop)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="a new folder: every kept image is copied there under its (new) label")
    where.add_argument("--manifest", help="a manifest CSV to write instead (path,label,split; no copies)")
    p.set_defaults(func=run_relabel)


def add_split(sub) -> None:
    p = sub.add_parser(
        "split",
        help="leak-free stratified split into a manifest CSV",
        epilog=SPLIT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="folder of class folders, folder of split folders, or manifest CSV")
    p.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
    p.add_argument("--test", type=float, default=0.15, help="test fraction (default 0.15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--group",
        choices=["near-duplicates", "none"],
        default="near-duplicates",
        help="keep near-duplicate images together (default) or split image by image",
    )
    p.add_argument(
        "--group-pattern",
        default="",
        help="regular expression over the file name; its first group (or whole match) names the group",
    )
    p.add_argument("--near-dup-distance", type=int, default=4)
    p.add_argument("--out", default="manifest.csv", help="manifest CSV to write (default manifest.csv)")
    p.add_argument("--json", action="store_true", help="print what the split achieved as JSON")
    p.set_defaults(func=run_split)


def print_check(report: CheckReport, show: int = 5) -> None:
    s = report.summary
    print(f"{s.images} images in {s.classes} classes ({s.layout} layout); {s.usable} usable, {s.bad} bad")
    if s.skipped_hidden or s.skipped_non_image:
        print(f"skipped {s.skipped_hidden} hidden and {s.skipped_non_image} non-image files")
    splits = list(s.counts)
    rows = [[label] + [s.counts[sp].get(label, 0) for sp in splits] + [n] for label, n in s.class_totals.items()]
    if rows:
        print()
        table(["class"] + splits + ["total"], rows)
    if s.classes >= 2:
        print(f"\nimbalance ratio (largest/smallest class): {s.imbalance_ratio:.2f}")
    by_code: dict[tuple[str, str], list] = defaultdict(list)
    for issue in report.issues:
        by_code[(issue.severity, issue.code)].append(issue)
    order = {"error": 0, "warning": 1, "info": 2}
    print()
    if not by_code:
        print("no findings")
    for (sev, code), issues in sorted(by_code.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        print(f"{sev.upper()} {code}: {len(issues)}")
        for issue in issues[:show]:
            print(f"  {issue.path + ': ' if issue.path else ''}{issue.message}")
        if len(issues) > show:
            print(f"  ... and {len(issues) - show} more (--json lists all)")
    print(f"\n{s.errors} error(s), {s.warnings} warning(s). Nothing was changed.")


def run_check(args) -> int:
    from fruitlens.pipelines.check import check_data

    result = check_data(
        args.data,
        labels=args.labels,
        audit_out=args.audit_out,
        min_size=args.min_size,
        near_dup_distance=args.near_dup_distance,
        img_size=args.img_size,
        folds=args.folds,
        workers=args.workers,
    )
    report, audit = result.report, result.audit
    if args.json:
        out = report.to_dict()
        if audit is not None:
            out["label_issues"] = [
                {
                    "path": i.path,
                    "label": i.label,
                    "suggested": i.suggested,
                    "score": i.score,
                    "p_label": i.p_label,
                    "p_suggested": i.p_suggested,
                    "rank": i.rank,
                    "kind": i.kind,
                    "evidence": i.evidence,
                }
                for i in audit.issues
            ]
            out["label_audit"] = {
                "html": audit.html,
                "csv": audit.csv,
                "audited": audit.audited,
                "method": audit.method,
                "rule": audit.rule,
                "notes": audit.notes,
                "seconds": audit.seconds,
                "expected_precision": audit.expected_precision,
                "lookalike": [
                    {"a": p.a, "b": p.b, "share": p.share, "a_as_b": p.a_as_b, "b_as_a": p.b_as_a}
                    for p in audit.lookalike
                ],
            }
        print_json(json_safe(out))
    else:
        print_check(report, args.show)
        if audit is not None:
            print_audit(audit, args.show * 4)
    return ExitCode.FINDINGS if report.errors else ExitCode.OK


def print_audit(audit, show: int = 20) -> None:
    print(f"\nlabel audit: {audit.text()} ({audit.audited} audited, {audit.seconds:.0f}s; {audit.method})")
    for note in audit.notes:
        print(f"  note: {note}")
    if audit.issues:
        pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
        table(
            ["rank", "image", "given", "suggested", "p(given)", "p(suggested)", "why"],
            [
                [i.rank, i.path, i.label, i.suggested, pct(i.p_label), pct(i.p_suggested), i.evidence]
                for i in audit.issues[:show]
            ],
        )
        if len(audit.issues) > show:
            print(f"... and {len(audit.issues) - show} more")
    if audit.lookalike:
        print("classes that look alike (the model confuses them; the labels can be right):")
        table(
            ["classes", "read as the other", "images"],
            [
                [f"{p.a} / {p.b}", f"{100 * p.share:.1f}% ({p.a_as_b} + {p.b_as_a})", p.n_a + p.n_b]
                for p in audit.lookalike[:8]
            ],
        )
    print(
        f"gallery: {audit.html}\ndecide:  fill in new_label in {audit.csv}, then "
        f"fruitlens relabel DATA {audit.csv} --out DATA_FIXED/"
    )


def run_relabel(args) -> int:
    from fruitlens.pipelines.relabel import relabel

    result = relabel(args.data, args.decisions, out=args.out, manifest=None if args.out else args.manifest)
    if args.out:
        where = f"copied {len(result.manifest)} images to {result.written} (and its manifest.csv)"
    else:
        where = f"wrote {args.manifest} ({len(result.manifest)} images, paths to the originals)"
    print(f"{result.relabelled} relabelled, {result.dropped} dropped; {where}. The original files are unchanged.")
    if result.new_classes:
        print(f"new classes: {', '.join(result.new_classes)}")
    if result.unknown_paths:
        print(
            f"warning: {len(result.unknown_paths)} row(s) of {args.decisions} name no image of {args.data}, "
            f"e.g. {result.unknown_paths[0]}"
        )
    return ExitCode.OK


def run_split(args) -> int:
    from fruitlens.pipelines.prepare import split_data

    group = "pattern" if args.group_pattern else args.group
    result = split_data(
        args.data,
        args.out,
        val=args.val,
        test=args.test,
        seed=args.seed,
        group=args.group,
        group_pattern=args.group_pattern,
        near_dup_distance=args.near_dup_distance,
    )
    if args.json:
        print_json(json_safe(result.facts()))
        return ExitCode.OK
    for note in result.notes:
        print(note)
    totals = Counter(r.split for r in result.manifest)
    n = sum(totals.values())
    rows = [[c] + [t.get(s, 0) for s in ("train", "val", "test")] for c, t in sorted(result.table.items())]
    rows.append(["TOTAL"] + [totals.get(s, 0) for s in ("train", "val", "test")])
    table(["class", "train", "val", "test"], rows)
    print(
        "achieved: "
        + ", ".join(f"{s} {totals.get(s, 0) / n:.1%}" for s in ("train", "val", "test"))
        + f" (asked: val {args.val:.0%}, test {args.test:.0%}; groups are kept whole so shares are approximate)"
    )
    groups = len({r.group for r in result.manifest})
    print(f"{groups} groups ({group})")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.excluded:
        print(f"left out {len(result.excluded)} unusable image(s):")
        for path, why in result.excluded:
            print(f"  {path}: {why}")
    leaked = sum(v["images"] for v in result.leaks.values())
    print(f"leaks across splits: {leaked} image(s)" + ("" if leaked else " (leak-free)"))
    print(f"wrote {args.out}")
    return ExitCode.OK
