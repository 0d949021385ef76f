"""When the benchmark has timed a member long enough: until its median's 95% interval is within a
relative width (`Stopping`, the rule `pipeline/evaluation/latency.py` applies round by round), with
floors and caps. Pure statistics: no processes, no models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def median_interval(samples_ms: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median from order statistics (scipy's quantile_test): what
    a bootstrap of the median estimates, exact and without resampling. None with too few samples."""
    from scipy.stats import quantile_test

    if len(samples_ms) < 2:
        return None
    values = np.asarray(samples_ms)
    interval = quantile_test(values, q=float(np.median(values)), p=0.5).confidence_interval(confidence)
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return None
    return float(interval.low), float(interval.high)


def relative_half_width(samples_ms: list[float]) -> float:
    """Half the width of the median's 95% interval relative to the median (inf with too few samples)."""
    interval = median_interval(samples_ms)
    if interval is None:
        return math.inf
    return (interval[1] - interval[0]) / 2 / float(np.median(samples_ms))


@dataclass(frozen=True)
class Stopping:
    """How long one member is timed at one setting (a thread count, model only or end to end).

    Every round visits it once (`visit`: for `round_seconds`, or `round_runs` calls in a fixed number of
    rounds). It stops after the
    round in which it has at least `min_runs` calls over `min_rounds` rounds and its p50's 95% interval
    is within `rel_ci` of the p50 ("stable"; `rel_ci` None: a fixed `min_rounds` rounds), or holds
    `max_runs` calls or `max_seconds` of timed calls (the caps, for a member too noisy to settle).
    """

    min_runs: int
    min_rounds: int
    round_seconds: float
    rel_ci: float | None = None
    max_runs: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.rel_ci is not None and self.max_runs is None and self.max_seconds is None:
            raise ValueError("a stability test needs max_runs or max_seconds: a noisy member might never settle")

    @property
    def round_runs(self) -> int:
        return math.ceil(self.min_runs / self.min_rounds)

    def visit(self, stable: bool) -> tuple[int, float]:
        """(at least this many calls, for at least this many seconds) of one visit. A fixed number of
        rounds (`rel_ci` None) needs `min_runs` within them: `round_runs` calls a visit. The adaptive
        rule visits by time alone, so every member's calls spread over the same rounds: with calls per
        visit, a 15 ms member reached its cap in a third of the rounds a 5 ms one needed and left, and
        the ratio of their medians compared two stretches of time. A member already stable keeps a
        quarter of the time while others of its setting go on."""
        if self.rel_ci is None or self.round_seconds <= 0:
            return self.round_runs, self.round_seconds
        return 1, self.round_seconds / 4 if stable else self.round_seconds

    def reason(self, samples_ms: list[float], rounds: int) -> str | None:
        """Why timing stops after `rounds` rounds with these samples, or None to go on."""
        if self.max_runs is not None and len(samples_ms) >= self.max_runs:
            return "max_runs"
        if self.max_seconds is not None and sum(samples_ms) >= self.max_seconds * 1000:
            return "max_seconds"
        if rounds < self.min_rounds or len(samples_ms) < self.min_runs:
            return None
        if self.rel_ci is None:
            return "fixed"
        return "stable" if relative_half_width(samples_ms) <= self.rel_ci else None


def benchmark_stopping(cfg: Any) -> Stopping:
    """The benchmark section's adaptive stopping (`BenchmarkConfig`: until each p50 is stable, capped)."""
    return Stopping(
        min_runs=cfg.min_runs, min_rounds=cfg.min_rounds, round_seconds=cfg.round_seconds, rel_ci=cfg.rel_ci,
        max_runs=cfg.max_runs, max_seconds=cfg.max_seconds,
    )
