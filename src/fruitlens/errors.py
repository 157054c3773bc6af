"""Errors a user can cause, each with a message (what and where) and a hint (what to do), and the one table of exit
codes.

Library code raises these; only ``fruitlens.cli`` turns them into ``error:``/``hint:`` lines and exit codes.
"""

from __future__ import annotations

import difflib
from enum import IntEnum
from typing import Iterable


class ExitCode(IntEnum):
    """Every exit status of the ``fruitlens`` command; each error kind maps to one member."""

    OK = 0
    FINDINGS = 1  # the command ran and found problems: check errors, images that failed to predict
    USAGE = 2  # a bad option, config key or value (argparse's own status too)
    DATA = 3
    MODEL = 4
    WEIGHTS = 5
    RUN_DIR = 6
    EXPORT = 7
    DOWNLOAD = 8
    FAILED = 9  # any other fruitlens error
    INTERNAL = 70  # a bug (EX_SOFTWARE): the message says to rerun with --traceback
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class FruitlensError(Exception):
    """Base class: ``message`` says what went wrong and where, ``hint`` what to do about it. Each kind names its
    exit code in its class line (``class DataError(FruitlensError, exit_code=ExitCode.DATA)``)."""

    exit_code = ExitCode.FAILED

    def __init_subclass__(cls, exit_code: ExitCode | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # keeps tracebacks and logs readable
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(FruitlensError, exit_code=ExitCode.USAGE):
    """A bad option, config key or value."""


class DataError(FruitlensError, exit_code=ExitCode.DATA):
    """The images, folders or manifest cannot be used as asked."""


class ImageError(DataError):
    """One image cannot be used; ``reason`` says why in one word (the service maps it to an HTTP status):
    ``missing``, ``empty``, ``not-an-image``, ``too-many-pixels``, ``bad-shape`` or ``undecodable``."""

    def __init__(self, message: str, hint: str | None = None, reason: str = "undecodable") -> None:
        super().__init__(message, hint)
        self.reason = reason


class ModelError(FruitlensError, exit_code=ExitCode.MODEL):
    """Unknown model, incompatible checkpoint, image size too small, ..."""


class WeightsError(FruitlensError, exit_code=ExitCode.WEIGHTS):
    """Pretrained weights are missing, cannot be downloaded or do not match."""


class RunDirError(FruitlensError, exit_code=ExitCode.RUN_DIR):
    """A run folder is missing a file that the command needs, or holds one that cannot be trusted."""


class ExportError(FruitlensError, exit_code=ExitCode.EXPORT):
    """Export failed or the exported model does not agree with PyTorch."""


class DownloadError(FruitlensError, exit_code=ExitCode.DOWNLOAD):
    """A download failed or its content did not verify."""


class Interrupted(FruitlensError, exit_code=ExitCode.INTERRUPTED):
    """Ctrl-C during a long job; the message says what was kept and how to continue."""


def did_you_mean(name: str, choices: Iterable[str], what: str) -> str:
    """Message for an unknown ``name``: ``unknown model 'x'. Did you mean 'y'? Available: a, b``."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    msg = f"unknown {what} '{name}'."
    if close:
        msg += f" Did you mean '{close[0]}'?"
    return msg + f" Available: {', '.join(choices)}"
