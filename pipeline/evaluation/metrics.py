"""Classification metrics (scikit-learn) and bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from pipeline.config.evaluation import EvaluationConfig
from pipeline.data import labels as label_utils


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes (single-label ids, or multi-label 0/1 indicator rows)."""
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def bootstrap_ci(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    metric: Callable[[np.ndarray, np.ndarray], float] = macro_f1,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric`, resampling examples with replacement."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    scores = np.empty(samples)
    for i in range(samples):
        index = rng.integers(0, n, n)
        scores[i] = metric(y_true[index], y_pred[index])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def single_label_metrics(
    labels: Sequence[int], predictions: Sequence[int], label_names: list[str], evaluation: EvaluationConfig
) -> dict[str, Any]:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    ids = list(range(len(label_names)))
    per_class = f1_score(labels, predictions, labels=ids, average=None, zero_division=0)
    low, high = bootstrap_ci(
        labels, predictions, macro_f1, evaluation.bootstrap_samples, evaluation.confidence, evaluation.seed
    )
    return {
        "macro_f1": macro_f1(labels, predictions),
        "macro_f1_ci95": [low, high],
        "accuracy": float(accuracy_score(labels, predictions)),
        "per_class_f1": {name: float(score) for name, score in zip(label_names, per_class)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        "predicted_classes": int(len(np.unique(predictions))),
        "examples": int(len(labels)),
    }


def multi_label_metrics(
    labels: np.ndarray, predictions: np.ndarray, label_names: list[str], evaluation: EvaluationConfig
) -> dict[str, Any]:
    """Metrics of one split from multi-label 0/1 indicator rows (accuracy is the exact-match ratio)."""
    per_label = f1_score(labels, predictions, average=None, zero_division=0)
    low, high = bootstrap_ci(
        labels, predictions, macro_f1, evaluation.bootstrap_samples, evaluation.confidence, evaluation.seed
    )
    never = [name for name, column in zip(label_names, predictions.T) if column.sum() == 0]
    return {
        "macro_f1": macro_f1(labels, predictions),
        "macro_f1_ci95": [low, high],
        "micro_f1": float(f1_score(labels, predictions, average="micro", zero_division=0)),
        "accuracy": float((labels == predictions).all(axis=1).mean()),  # exact match
        "per_label_f1": {name: float(score) for name, score in zip(label_names, per_label)},
        "never_predicted": never,
        "predicted_classes": int(len(label_names) - len(never)),
        "examples": int(len(labels)),
    }


def summary(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scalar metrics of one split, prefixed (`test_macro_f1`, ...), for MLflow and DVC."""
    return {f"{prefix}_{key}": float(value) for key, value in metrics.items() if isinstance(value, (int, float))}


def evaluate_logits(
    logits: np.ndarray,
    labels: Sequence[Any],
    label_names: list[str],
    task_type: str,
    evaluation: EvaluationConfig,
    threshold: float | Sequence[float] = 0.5,
) -> dict[str, Any]:
    """Full metrics of one split from the model's logits."""
    predictions = label_utils.decide(logits, task_type, threshold)
    if task_type == "multi_label":
        return multi_label_metrics(np.asarray(labels).astype(int), predictions, label_names, evaluation)
    return single_label_metrics(labels, predictions, label_names, evaluation)
