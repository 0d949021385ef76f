"""Read the configured source, check it, drop duplicates and write a stratified train/validation/test split."""

from __future__ import annotations

from typing import Any

from pipeline import tracking
from pipeline.config import Params
from pipeline.data.prepare import prepare
from pipeline.data.prepared import SPLITS
from pipeline.io import atomic_dir
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Write data/prepared/{train,validation,test}.jsonl, manifest.json and (with transfer.path) transfer.jsonl."""
    out = params.path(params.paths.prepared)
    with atomic_dir(out) as tmp:
        manifest = prepare(params, tmp)
    tracking.log_artifact(out / "manifest.json", "data")
    metrics: dict[str, Any] = {
        "rows_read": manifest["rows_read"],
        "exact_duplicates_dropped": manifest["exact_duplicates_dropped"],
        "conflicting_rows_dropped": manifest["conflicting_rows_dropped"],
        "classes": len(manifest["label_names"]),
        **{f"near_duplicates_dropped_{split}": count for split, count in manifest["near_duplicates_dropped"].items()},
    }
    for split in SPLITS:
        metrics[f"{split}_rows"] = manifest["splits"][split]["rows"]
    if "transfer" in manifest:
        transfer = manifest["transfer"]
        metrics.update({f"transfer_{key}": transfer[key] for key in (
            "rows_read", "split_duplicates_dropped", "near_duplicates_dropped", "similar_kept", "duplicates_dropped", "kept")})
    return metrics


STAGE = Stage("prepare_data", run, sections=("data", "task", "transfer"), outputs=("prepared",))

if __name__ == "__main__":
    STAGE.main()
