"""Errors a user can act on. The stage runner prints their message (no traceback) and exits nonzero."""


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
