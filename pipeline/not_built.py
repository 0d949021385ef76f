"""A family member its stage was told not to build (`enabled: false`) or could not build: the member's
directory holds only the reason, so it is still the stage's DVC output; the benchmark and the report
leave the member out and say why."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.io import atomic_dir, write_text_atomic

log = logging.getLogger(__name__)

NOT_BUILT_FILE = "NOT_BUILT.txt"


def mark_not_built(out: Path, reason: str) -> dict[str, Any]:
    """Replace `out` with a directory holding only why the member was not built. Returns the stage's metrics."""
    with atomic_dir(out) as tmp:
        write_text_atomic(tmp / NOT_BUILT_FILE, reason + "\n")
    log.warning("%s not built: %s", Path(out).name, reason)
    return {"built": False, "not_built_reason": reason}


def not_built_reason(model_dir: Path) -> str | None:
    """Why the member in `model_dir` was not built, or None."""
    path = Path(model_dir) / NOT_BUILT_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None
