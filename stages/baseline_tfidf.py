"""The `tfidf` reference member: TF-IDF n-grams and a linear classifier (scikit-learn), trained on the
training split with C chosen on validation. The cheapest alternative to the family; it needs no teacher."""

from __future__ import annotations

import time
from typing import Any

from pipeline import tracking
from pipeline.baselines import tfidf
from pipeline.baselines.classifiers import TfidfClassifier
from pipeline.baselines.common import files_size_mb, reference_details
from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.evaluation.record import INFO_FILE, evaluate_and_record
from pipeline.io import atomic_dir
from pipeline.not_built import mark_not_built
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Read the prepared splits; write paths.baseline_tfidf (switched off: only why not)."""
    cfg = params.baselines.tfidf
    out = params.path(params.paths.baseline_tfidf)
    if not cfg.enabled:
        return mark_not_built(out, "baselines.tfidf.enabled is false")
    prepared = load_prepared(params.path(params.paths.prepared))
    start = time.perf_counter()
    fitted, coef, intercept, chosen = tfidf.fit(
        cfg, *[(prepared.texts(split), prepared.labels(split).astype(int)) for split in ("train", "validation")],
        prepared.task_type,
    )
    seconds = time.perf_counter() - start
    with atomic_dir(out) as tmp:
        tfidf.save(tmp, fitted, coef, intercept, prepared.label_names, prepared.task_type)
        classifier = TfidfClassifier.load(tmp)  # evaluated as it is served: from the saved files
        record, _ = evaluate_and_record(
            classifier.logits, prepared, params.evaluation, tmp, member=STAGE.member, stage=STAGE.name,
            max_length=0,  # no limit: every word of a text counts
            num_parameters=classifier.num_parameters(),
            size_mb=files_size_mb(tmp, TfidfClassifier.weight_files),
            training_seconds=seconds, params={"baselines": {"tfidf": cfg.model_dump(mode="json")}},
            details=reference_details("TF-IDF n-grams + LinearSVC (scikit-learn)", "fp32", chosen),
        )
    tracking.log_artifact(out / INFO_FILE, STAGE.member)
    return {**record.metrics(), "C": chosen["C"]}


STAGE = Stage("baseline_tfidf", run, member="tfidf", sections=("baselines",), outputs=("baseline_tfidf",),
              reference=True)

if __name__ == "__main__":
    STAGE.main()
