"""Label encoding and decisions, for single-label (softmax) and multi-label (sigmoid) tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification"}


def problem_type(task_type: str) -> str:
    return PROBLEM_TYPES[task_type]


def encode(label: Any, names: list[str], task_type: str) -> int | list[float]:
    """A class name -> its id; a list of label names -> a multi-hot float vector."""
    if task_type == "multi_label":
        present = set(label)
        return [1.0 if name in present else 0.0 for name in names]
    return names.index(label)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def probabilities(logits: np.ndarray, task_type: str) -> np.ndarray:
    return sigmoid(logits) if task_type == "multi_label" else softmax(logits)


def decide(logits: np.ndarray, task_type: str, threshold: float | Sequence[float] = 0.5) -> np.ndarray:
    """Predicted class ids (single-label) or 0/1 indicator rows (multi-label, per-label thresholds ok)."""
    logits = np.asarray(logits, dtype=np.float64)
    if task_type == "multi_label":
        return (sigmoid(logits) >= np.asarray(threshold)).astype(int)
    return logits.argmax(axis=-1)
