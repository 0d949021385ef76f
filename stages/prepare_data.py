"""Read the configured source, check it, drop duplicates and write a stratified train/validation/test split."""

from __future__ import annotations

from typing import Any

from pipeline import tracking
from pipeline.config import Params
from pipeline.data import prepare
from pipeline.io import atomic_dir
from pipeline.prepared import SPLITS
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Write data/prepared/{train,validation,test}.jsonl and manifest.json."""
    out = params.path(params.paths.prepared)
    with atomic_dir(out) as tmp:
        manifest = prepare(params, tmp)
    tracking.log_artifact(out / "manifest.json", "data")
    metrics: dict[str, Any] = {
        "rows_read": manifest["rows_read"],
        "exact_duplicates_dropped": manifest["exact_duplicates_dropped"],
        "conflicting_rows_dropped": manifest["conflicting_rows_dropped"],
        "classes": len(manifest["label_names"]),
    }
    for split in SPLITS:
        metrics[f"{split}_rows"] = manifest["splits"][split]["rows"]
    return metrics


STAGE = Stage("prepare_data", run, sections=("data", "task"))

if __name__ == "__main__":
    STAGE.main()
