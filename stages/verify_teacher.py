"""The quality gate: the teacher must reach verify_teacher.min_macro_f1 on validation and must not
predict one class for everything. A failure stops the DAG: nothing downstream runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import tracking
from pipeline.config import Params
from pipeline.data.prepared import load_prepared
from pipeline.errors import GateError
from pipeline.evaluation.metrics import evaluate_logits
from pipeline.models import decision_thresholds, load_trained_with_tokenizer, predict_logits
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Evaluate paths.teacher on the validation split; raise GateError when it is not good enough."""
    prepared = load_prepared(params.path(params.paths.prepared))
    names, task = prepared.label_names, params.task
    model, tokenizer = load_trained_with_tokenizer(params.path(params.paths.teacher), names)
    logits = predict_logits(model, tokenizer, prepared.texts("validation"), params.task.max_length).numpy()
    thresholds = decision_thresholds(model, task.threshold)
    metrics = evaluate_logits(logits, prepared.labels("validation"), names, task.type, params.evaluation, thresholds)
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


STAGE = Stage("verify_teacher", run, member="teacher", sections=("verify_teacher",))

if __name__ == "__main__":
    STAGE.main()
