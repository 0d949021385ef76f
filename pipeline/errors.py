"""Errors a user can act on. The stage runner prints their message (no traceback) and exits nonzero."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path


class FinCompressError(Exception):
    """A problem with the user's input, params or environment, with a message saying how to fix it."""


class ConfigError(FinCompressError):
    """Invalid params."""


class DataError(FinCompressError):
    """Unreadable, malformed or unusable data."""


class ModelError(FinCompressError):
    """A model directory that is missing, incomplete or does not fit the task."""


class GateError(FinCompressError):
    """A quality gate failed (the teacher is not good enough, a parity check failed)."""


class TransientError(FinCompressError):
    """Something outside the inputs failed (a tracking server is down): running again may succeed."""


class OutputError(FinCompressError):
    """An output path that would overwrite something this pipeline did not write, or is in use."""


def log_file_for(command: str, directory: Path) -> Path:
    """The log file of one run of `command`: everything logged, tracebacks included."""
    return directory / f"fincompress-{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"


def unexpected_error_message(command: str, error: BaseException, log_file: Path) -> str:
    """Append the traceback of an unexpected exception to `log_file`; return the one-line message for
    the terminal (`<command>: <what> ... how to go on`)."""
    what = f"unexpected {type(error).__name__}: {' '.join(str(error).split())[:300]}"
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a", encoding="utf-8") as out:
            out.write("".join(traceback.format_exception(error)))
        where = f"the traceback is in {log_file}"
    except OSError:
        where = "the traceback could not be written to a log file"
    return (f"{command}: {what}; {where}. This is not a known input problem: check the inputs and the "
            "machine (disk space, permissions), run again, and report the log file if it persists")
