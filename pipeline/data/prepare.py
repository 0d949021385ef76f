"""The prepare_data stage's work: read, check, de-duplicate and split the source, add the transfer
texts, and write the prepared splits with their manifest (counts and content hashes)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.config.data import DEMO_TRANSFER_PATH, transfer_path
from pipeline.data.prepared import SPLITS, write_prepared, write_transfer
from pipeline.data.sources import read_source
from pipeline.data.splitting import (
    deduplicate,
    drop_cross_split_near_duplicates,
    label_names_for,
    split_examples,
    to_examples,
)
from pipeline.data.transfer import prepare_transfer
from pipeline.errors import DataError

log = logging.getLogger(__name__)


def prepare(params: Params, out_dir: Path) -> dict[str, Any]:
    """Read, check, de-duplicate and split the source; write the splits and manifest into `out_dir`."""
    if transfer_path(params.transfer, params.data) == DEMO_TRANSFER_PATH and params.data.source != "demo":
        log.warning(
            "transfer.path is the demo's unlabelled news (%s) but the labelled data is your own (%s): the students "
            "will also learn from those texts. Set transfer.path to unlabelled texts of your domain, or to null",
            DEMO_TRANSFER_PATH, params.data.path,
        )
    records, source = read_source(params)
    examples = to_examples(records, params.data, params.task)
    if not examples:
        raise DataError(f"the input has no examples ({source}); check data.path")
    kept, duplicates, conflicts = deduplicate(examples)
    if duplicates or conflicts:
        log.info("dropped %d duplicates (in any spelling) and %d rows whose text had conflicting labels", duplicates, conflicts)
    names = label_names_for(kept, params.data)
    splits = split_examples(kept, names, params)
    near = drop_cross_split_near_duplicates(splits)
    manifest = {
        "task_type": params.task.type,
        "source": source,
        "rows_read": len(records),
        "exact_duplicates_dropped": duplicates,
        "conflicting_rows_dropped": conflicts,
        # Dropped from train (near a validation/test text) and from validation (near a test text).
        "near_duplicates_dropped": {split: near[split]["near_duplicates_dropped"] for split in near},
        "near_duplicate_examples": {split: near[split]["examples"]["near"] for split in near},
        "similar_kept": {split: near[split]["similar_kept"] for split in near},
        "near_duplicate_similarity": near["train"]["near_duplicate_similarity"],
        "seed": params.data.seed,
        "fractions": {"validation": params.data.validation_fraction, "test": params.data.test_fraction},
    }
    if transfer_path(params.transfer, params.data) is not None:  # without a transfer set the outputs are exactly as before
        texts, info = prepare_transfer(params, splits)
        manifest["transfer"] = {**info, "sha256": write_transfer(out_dir, texts)}
    pairs = {name: [(example.text, example.label) for example in splits[name]] for name in SPLITS}
    return write_prepared(out_dir, pairs, names, manifest)
