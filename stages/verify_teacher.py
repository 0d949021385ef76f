"""The quality gate: the teacher must reach verify_teacher.min_macro_f1 on validation and must not
predict one class for everything. A failure stops the DAG: nothing downstream runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import tracking
from pipeline.config import Params
from pipeline.data import load_manifest, load_split
from pipeline.errors import GateError
from pipeline.labels import encode
from pipeline.metrics import evaluate_logits
from pipeline.models import decision_thresholds, load_trained_with_tokenizer, predict_logits
from pipeline.stage import main


def run(params: Params) -> dict[str, Any]:
    """Evaluate paths.teacher on the validation split; raise GateError when it is not good enough."""
    prepared = params.path(params.paths.prepared)
    manifest = load_manifest(prepared)
    names, task = manifest["label_names"], params.task
    teacher_dir = params.path(params.paths.teacher)
    model, tokenizer = load_trained_with_tokenizer(teacher_dir, names)
    rows = load_split(prepared, "validation")
    logits = predict_logits(model, tokenizer, [row["text"] for row in rows], params.teacher.max_length).numpy()
    labels = np.asarray([encode(row["label"], names, task.type) for row in rows])
    thresholds = decision_thresholds(model, task.threshold)
    metrics = evaluate_logits(logits, labels, names, task.type, params.evaluation, thresholds)
    threshold = params.verify_teacher.min_macro_f1
    result: dict[str, Any] = {
        "validation_macro_f1": metrics["macro_f1"],
        "validation_accuracy": metrics["accuracy"],
        "per_class_f1": metrics.get("per_class_f1") or metrics.get("per_label_f1"),
        "confusion_matrix": metrics.get("confusion_matrix"),
    }
    failures = []
    if metrics["macro_f1"] < threshold:
        failures.append(f"validation macro-F1 {metrics['macro_f1']:.4f} is below the threshold {threshold}")
    if task.type == "single_label" and metrics["predicted_classes"] <= 1:
        only = names[int(np.argmax(logits, axis=-1)[0])]
        failures.append(f"it predicts {only!r} for every validation example")
    if task.type == "multi_label" and metrics.get("never_predicted"):
        failures.append(f"it never predicts the labels {metrics['never_predicted']}")
    # The threshold is deliberately not in the result: downstream stages depend on this file, and
    # moving the threshold without changing the teacher must not invalidate them.
    result["passed"] = not failures
    if failures:
        tracking.log_metrics({**result, "min_macro_f1": threshold})
        per_class = ", ".join(f"{k}={v:.3f}" for k, v in result["per_class_f1"].items())
        raise GateError(
            "teacher gate failed: " + "; ".join(failures) + f". Per-class F1: {per_class}. "
            f"Confusion matrix (rows: true {names}): {result['confusion_matrix']}. Train it better "
            "(teacher.epochs, teacher.learning_rate) or, if this quality is acceptable, lower "
            "verify_teacher.min_macro_f1."
        )
    return result


if __name__ == "__main__":
    main(run, stage="verify_teacher", member="teacher", sections=("verify_teacher",))
