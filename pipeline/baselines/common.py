"""What building a reference member shares (tfidf.py, static.py and their stages): choosing a linear
classifier's C on validation, its weights in the form the classifiers load, and its record's details.
The classifiers themselves are in classifiers.py; a member switched off is pipeline/not_built.py's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import labels as label_utils

log = logging.getLogger(__name__)

def files_size_mb(model_dir: Path, names: tuple[str, ...]) -> float:
    """The size of a reference member: the files named (its weights), in MB."""
    return sum((Path(model_dir) / name).stat().st_size for name in names if (Path(model_dir) / name).is_file()) / 1e6


def reference_details(description: str, precision: str, chosen: dict[str, Any]) -> dict[str, Any]:
    """The record details every reference member has: what it is, and what validation chose."""
    return {"reference": True, "description": description, "precision": precision, **chosen}


def class_weights(classifier: Any) -> tuple[np.ndarray, np.ndarray]:
    """A fitted linear classifier (LinearSVC, LogisticRegression, or a OneVsRestClassifier of them) as
    one weight row and bias per class, float32 in C order (safetensors writes the raw buffer, and
    scikit-learn keeps coef_ in Fortran order). A binary classifier's single margin m becomes the
    columns [0, m]: their argmax is its decision and their softmax is sigmoid(m). A label constant in
    train (a OneVsRestClassifier's constant predictor) gets a constant margin of its one value."""
    if hasattr(classifier, "estimators_"):
        width = next((e.coef_.shape[1] for e in classifier.estimators_ if hasattr(e, "coef_")), 0)
        rows, biases = [], []
        for estimator in classifier.estimators_:
            constant = not hasattr(estimator, "coef_")
            rows.append(np.zeros(width) if constant else estimator.coef_[0])
            biases.append((1.0 if np.asarray(estimator.y_).ravel()[0] else -1.0) if constant else estimator.intercept_[0])
        coef, intercept = np.vstack(rows), np.asarray(biases)
    else:
        coef, intercept = np.atleast_2d(classifier.coef_), np.atleast_1d(classifier.intercept_)
        if coef.shape[0] == 1:
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    return np.ascontiguousarray(coef, np.float32), np.ascontiguousarray(intercept, np.float32)


def choose_c(
    fit: Callable[[float], Any], logits_of: Callable[[Any], np.ndarray], c_grid: list[float],
    validation_labels: np.ndarray, task_type: str,
) -> tuple[Any, float, dict[str, float]]:
    """Fit one model per C (on train, inside `fit`) and keep the one whose validation macro-F1 is best
    (ties: the smaller C, the simpler model). Returns it, its C and every C's validation macro-F1."""
    from pipeline.evaluation.metrics import macro_f1

    scores: dict[str, float] = {}
    best = None
    for c in sorted(c_grid):
        model = fit(c)
        predictions = label_utils.decide(logits_of(model), task_type)
        scores[f"{c:g}"] = macro_f1(validation_labels, predictions)
        if best is None or scores[f"{c:g}"] > best[2]:
            best = (model, c, scores[f"{c:g}"])
    log.info("validation macro-F1 by C: %s; kept C=%g", scores, best[1])
    return best[0], best[1], scores
