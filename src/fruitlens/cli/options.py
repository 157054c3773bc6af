"""argparse types shared by the commands: bounded whole numbers and the "not sure" threshold."""

from __future__ import annotations

import argparse


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound without ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number but received '{text}'") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {low}" + (f" to {high}" if high else " up") + f" but received {value}"
            )
        return value

    return parse


def threshold(text: str) -> float | str:
    """``auto`` or a probability in [0, 1]."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a probability between 0 and 1 but received '{text}'")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1 but received {value:g}")
    return value
