"""Errors a user can cause, each with a message (what and where) and a hint (what to do).

Library code raises these; only ``fruitlens.cli`` turns them into ``error:``/``hint:`` lines and exit codes.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class FruitlensError(Exception):
    """Base class: ``message`` says what went wrong and where, ``hint`` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # keeps tracebacks and logs readable
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(FruitlensError):
    """A bad option, config key or value."""

    exit_code = 2


class DataError(FruitlensError):
    """The images, folders or manifest cannot be used as asked."""

    exit_code = 3


class ModelError(FruitlensError):
    """Unknown model, incompatible checkpoint, image size too small, ..."""

    exit_code = 4


class WeightsError(FruitlensError):
    """Pretrained weights are missing, cannot be downloaded or do not match."""

    exit_code = 5


class RunDirError(FruitlensError):
    """A run folder is missing a file that the command needs."""

    exit_code = 6


class ExportError(FruitlensError):
    """Export failed or the exported model does not agree with PyTorch."""

    exit_code = 7


class DownloadError(FruitlensError):
    """A download failed or its content did not verify."""

    exit_code = 8


def did_you_mean(name: str, choices: Iterable[str], what: str) -> str:
    """Message for an unknown ``name``: ``unknown model 'x'. Did you mean 'y'? Available: a, b``."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    msg = f"unknown {what} '{name}'."
    if close:
        msg += f" Did you mean '{close[0]}'?"
    return msg + f" Available: {', '.join(choices)}"
