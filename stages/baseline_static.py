"""The `static` reference member: a model2vec static embedding model distilled from the verified teacher
and a LogisticRegression trained on the training split, C chosen on validation. Texts become the mean
of their tokens' vectors: no attention, no layers, microseconds per sentence."""

from __future__ import annotations

import time
from typing import Any

from pipeline import tracking
from pipeline.baselines import static
from pipeline.baselines.classifiers import STATIC_MAX_TOKENS, StaticClassifier
from pipeline.baselines.common import files_size_mb, reference_details
from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.evaluation.record import INFO_FILE, evaluate_and_record
from pipeline.io import atomic_dir
from pipeline.not_built import mark_not_built
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Read paths.teacher and the prepared splits; write paths.baseline_static (switched off, or a teacher
    model2vec cannot distil: only why not)."""
    cfg = params.baselines.static
    out = params.path(params.paths.baseline_static)
    if not cfg.enabled:
        return mark_not_built(out, "baselines.static.enabled is false")
    prepared = load_prepared(params.path(params.paths.prepared))
    start = time.perf_counter()
    try:
        model, vocabulary = static.distill(
            params.path(params.paths.teacher), cfg, prepared.texts("train") + prepared.transfer_texts()
        )
    except static.CannotDistill as error:
        return mark_not_built(out, str(error))
    splits = [(prepared.texts(split), prepared.labels(split).astype(int)) for split in ("train", "validation")]
    head, c, scores = static.fit_head(model, cfg.c_grid, *splits, prepared.task_type)
    seconds = time.perf_counter() - start
    with atomic_dir(out) as tmp:
        static.save(tmp, model, head, prepared.label_names, prepared.task_type)
        classifier = StaticClassifier.load(tmp)  # evaluated as it is served: from the saved files
        record, _ = evaluate_and_record(
            classifier.logits, prepared, params.evaluation, tmp, member=STAGE.member, stage=STAGE.name,
            source=params.paths.teacher, max_length=STATIC_MAX_TOKENS, num_parameters=classifier.num_parameters(),
            size_mb=files_size_mb(tmp, StaticClassifier.weight_files),
            training_seconds=seconds, params={"baselines": {"static": cfg.model_dump(mode="json")}},
            details=reference_details(
                "model2vec static embeddings distilled from the teacher + LogisticRegression (scikit-learn)",
                "fp16",  # model2vec stores the token vectors in float16
                {"C": c, "validation_macro_f1_by_C": scores, "vocabulary": vocabulary},
            ),
        )
    tracking.log_artifact(out / INFO_FILE, STAGE.member)
    return {**record.metrics(), "C": c, "tokens": vocabulary["tokens"], "dims": vocabulary["dims"]}


STAGE = Stage("baseline_static", run, member="static", sections=("baselines",), outputs=("baseline_static",),
              reference=True)

if __name__ == "__main__":
    STAGE.main()
