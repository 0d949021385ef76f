"""Multi-label specifics: iterative stratification and per-label decision thresholds (the metrics are
in metrics.py)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from pipeline.errors import DataError

log = logging.getLogger(__name__)


def iterative_split(
    examples: list[Any],
    names: list[str],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    on_missing: str = "error",
) -> dict[str, list[Any]]:
    """Iterative stratification (Sechidis et al., 2011): rare labels are placed first, each example
    going to the split that most lacks its label, so every label reaches every split when it can."""
    if not examples:
        raise DataError("the input has no examples; check data.source and data.path")
    splits = ("train", "validation", "test")
    fractions = np.array([1 - validation_fraction - test_fraction, validation_fraction, test_fraction])
    label_index = {name: i for i, name in enumerate(names)}
    y = np.zeros((len(examples), len(names)), dtype=int)
    for row, example in enumerate(examples):
        for name in example.label:
            y[row, label_index[name]] = 1
    totals = y.sum(axis=0)
    rare = {names[i]: int(totals[i]) for i in range(len(names)) if totals[i] < len(splits)}
    if rare:
        raise DataError(
            f"labels too rare to reach train, validation and test: {rare}; each needs at least 3 examples. "
            "Add examples or drop the label from data.label_names."
        )
    rng = np.random.default_rng(seed)
    desired_label = np.outer(fractions, totals).astype(float)
    desired_total = fractions * len(examples)
    remaining = set(range(len(examples)))
    assignment = np.full(len(examples), -1)
    while remaining:
        rows = np.array(sorted(remaining))
        counts = y[rows].sum(axis=0)
        if counts.sum() == 0:  # examples without any label: fill by size
            for row in rng.permutation(rows):
                target = int(np.argmax(desired_total + rng.random(3) * 1e-9))
                assignment[row] = target
                desired_total[target] -= 1
            break
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(int).max)))
        for row in rng.permutation(rows[y[rows, label] == 1]):
            need = desired_label[:, label].copy()
            # A split without any example of this label comes first, so rare labels reach every split.
            have = np.array([(y[assignment == k, label]).sum() for k in range(len(splits))])
            need[have == 0] += len(examples)
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:
                totals_best = desired_total[best]
                best = best[totals_best == totals_best.max()]
            target = int(rng.choice(best))
            assignment[row] = target
            desired_label[target] -= y[row]
            desired_total[target] -= 1
            remaining.discard(int(row))
    result = {name: [examples[i] for i in np.flatnonzero(assignment == k)] for k, name in enumerate(splits)}
    for k, split in enumerate(splits):
        present = y[assignment == k].sum(axis=0)
        absent = [names[i] for i in range(len(names)) if present[i] == 0]
        if absent:
            message = f"labels {absent} have no example in the {split} split"
            if on_missing == "error":
                raise DataError(message + "; add examples or set task.missing_label_in_split=warn")
            log.warning(message)
    return result


def tune_thresholds(probabilities: np.ndarray, labels: np.ndarray, grid: np.ndarray | None = None) -> list[float]:
    """Per-label threshold that maximises that label's F1 on (validation) data."""
    grid = np.linspace(0.05, 0.95, 19) if grid is None else grid
    thresholds = []
    for column in range(labels.shape[1]):
        scores = [
            f1_score(labels[:, column], (probabilities[:, column] >= t).astype(int), zero_division=0) for t in grid
        ]
        thresholds.append(round(float(grid[int(np.argmax(scores))]), 4))
    return thresholds
