"""``fruitlens`` entry point: builds the parser, runs one command, maps errors to ``error:``/``hint:`` and exit
codes."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
import traceback

from fruitlens import __version__
from fruitlens.errors import ExitCode, FruitlensError, did_you_mean
from fruitlens.runtime import is_ddp_child, limit_heap_growth

EXAMPLES = """examples:
  fruitlens check photos/                              # bad files, imbalance, duplicates, leaks
  fruitlens check photos/ --labels                     # + images that look mislabelled (a gallery to review)
  fruitlens split photos/ --out manifest.csv           # leak-free stratified split
  fruitlens train photos/ --model mobilenet_v2 --out runs/mnv2
  fruitlens evaluate runs/mnv2                         # report.html + report.json
  fruitlens predict runs/mnv2 apple.jpg --top-k 3
  fruitlens export runs/mnv2 --format onnx --int8
  fruitlens serve runs/mnv2 --port 8000
  fruitlens suggest runs/mnv2 my-photos/ --budget 90   # which of your photos to label, and a page to label them
  fruitlens train photos/ --add to-label/to-label.csv --out runs/mine   # + the photos of your setting you labelled
  fruitlens demo                                       # the whole job on Fruits-360

'fruitlens COMMAND --help' shows each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    from fruitlens.cli import data_cmds, demo_cmds, eval_cmds, infer_cmds, label_cmds, model_cmds, train_cmds

    parser = argparse.ArgumentParser(
        prog="fruitlens",
        description="Train, evaluate, export and serve fruit image classifiers by transfer learning.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fruitlens {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full stack on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data_cmds.add_check(sub)
    data_cmds.add_split(sub)
    data_cmds.add_relabel(sub)
    for mod in (train_cmds, eval_cmds, infer_cmds, label_cmds, demo_cmds):
        mod.register(sub)
    model_cmds.add_models(sub)
    model_cmds.add_weights(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    import warnings

    fmt = "%(relativeCreated)7.0fms %(message)s" if os.environ.get("FRUITLENS_LOG_TIME") else "%(message)s"
    # the other processes of a DDP run say only what breaks: rank zero speaks for the run
    level = logging.DEBUG if verbose else logging.ERROR if is_ddp_child() else logging.INFO
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for noisy in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "PIL",
        "matplotlib",
        "urllib3",
        "httpx",
        "onnxruntime",
    ):
        logger = logging.getLogger(noisy)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        logger.propagate = False if noisy.startswith("lightning") else logger.propagate
    if not verbose:  # library chatter that says nothing to a fruitlens user
        for pattern in (
            ".*LeafSpec.*",
            ".*log_every_n_steps.*",
            ".*litlogger.*",
            ".*does not have many workers.*",
            ".*TracerWarning.*",
            r".*module\(s\) in eval mode.*",
            ".*Checkpoint directory.*exists and is not empty.*",
            ".*overridden `on_after_batch_transfer`.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _suggest_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``fruitlens tran ...``: argparse's "invalid choice" with the command meant, when one is close."""
    first = next((a for a in argv if not a.startswith("-")), None)
    commands = _subparsers(parser)
    if first is not None and first not in commands:
        parser.error(did_you_mean(first, commands, "command"))


def _unknown_options(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> None:
    """Exits with the command's own usage, naming each unknown option and the option it most likely meant."""
    sub = _subparsers(parser).get(command, parser) if command else parser
    known = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    words = []
    for e in extra:
        close = difflib.get_close_matches(e.split("=")[0].replace("_", "-"), known, n=1, cutoff=0.6)
        words.append(f"{e} (did you mean {close[0]}?)" if close and e.startswith("-") else e)
    sub.error(f"unrecognized arguments: {', '.join(words)}")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status instead of exiting (tests call it in-process)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    _suggest_command(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after the options: "train DATA --out r fit.epochs=3"
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            _unknown_options(parser, args.command, extra)
    if not args.command:
        parser.print_help()
        return ExitCode.USAGE
    _setup_logging(args.verbose)
    limit_heap_growth()
    try:
        return int(args.func(args) or 0)
    except FruitlensError as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # the reader went away ("| head"): nothing more to say, and nobody to say it to
        with contextlib.suppress(OSError, ValueError, AttributeError):  # the interpreter's last flush must not fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except Exception as exc:  # a bug: say so plainly, the stack is one flag away
        if args.traceback or os.environ.get("FRUITLENS_TRACEBACK"):
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        print("hint: rerun with --traceback and report the stack", file=sys.stderr)
        return ExitCode.INTERNAL
