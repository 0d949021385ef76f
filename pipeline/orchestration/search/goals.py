"""The user's goals and when to stop: a trial's outcome, how far it is from each goal, progress between
trials, the Pareto front and the closest trial when none meets every goal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.search import SearchConfig, SearchGoals


@dataclass(frozen=True)
class Outcome:
    """One finished trial, as the goal and stopping logic sees it."""

    number: int
    state: str  # COMPLETE | FAIL | PRUNED
    retention: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    validation_macro_f1: float | None = None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and self.latency_ms is not None


GOAL_AXES = (
    # goal key, outcome attribute, +1 when the value must be at least the goal, -1 at most
    ("min_retention", "retention", +1),
    ("max_latency_ms", "latency_ms", -1),
    ("max_size_mb", "size_mb", -1),
)


def shortfalls(outcome: Outcome, goals: SearchGoals) -> dict[str, float]:
    """Per goal set: how far the trial is from it (0 when met)."""
    gaps = {}
    for goal, attribute, sign in GOAL_AXES:
        target = getattr(goals, goal)
        if target is not None:
            gaps[goal] = max(0.0, sign * (target - getattr(outcome, attribute)))
    return gaps


def constraints(outcome: Outcome, goals: SearchGoals) -> dict[str, float]:
    """Optuna's constraint values (feasible when every one is <= 0), one per goal set."""
    values = {}
    for goal, attribute, sign in GOAL_AXES:
        target = getattr(goals, goal)
        if target is not None:
            values[goal] = sign * (target - getattr(outcome, attribute))
    return values


def meets_goals(outcome: Outcome, goals: SearchGoals) -> bool:
    return outcome.complete and all(gap == 0 for gap in shortfalls(outcome, goals).values())


def improves(candidate: Outcome, best: Outcome | None) -> bool:
    """Among trials meeting the goals: strictly faster, or as fast and smaller."""
    if best is None:
        return True
    if candidate.latency_ms != best.latency_ms:
        return candidate.latency_ms < best.latency_ms
    return candidate.size_mb < best.size_mb


def trials_without_improvement(outcomes: list[Outcome], goals: SearchGoals) -> int | None:
    """Finished trials since the last improvement among those meeting the goals; None until one meets them."""
    best, since = None, None
    for outcome in sorted(outcomes, key=lambda o: o.number):
        if meets_goals(outcome, goals) and improves(outcome, best):
            best, since = outcome, 0
        elif since is not None:
            since += 1
    return since


def stop_reason(
    outcomes: list[Outcome], started: int, cfg: SearchConfig, seconds_left: float, trial_seconds: float | None
) -> str | None:
    """Why no further trial should start, or None. `started`: trials in the study (running included);
    `trial_seconds`: what a trial has typically taken (None before the first one ends)."""
    if started >= cfg.budget.trials:
        return f"trial budget used ({started} of {cfg.budget.trials})"
    if seconds_left <= 0:
        return f"time budget used ({cfg.budget.minutes:g} minutes)"
    if trial_seconds is not None and trial_seconds > seconds_left:
        return f"time budget: {seconds_left / 60:.1f} minutes left, a trial takes about {trial_seconds / 60:.1f}"
    since = trials_without_improvement(outcomes, cfg.goals)
    if since is not None and since >= cfg.patience:
        return f"patience: {since} trials without a faster model meeting the goals"
    return None


def pareto_front(outcomes: list[Outcome]) -> list[int]:
    """Numbers of the complete trials no other complete trial beats on validation F1, latency and size
    at once (at least as good on all three, better on one)."""
    complete = [o for o in outcomes if o.complete]

    def dominates(a: Outcome, b: Outcome) -> bool:
        no_worse = (a.validation_macro_f1 >= b.validation_macro_f1 and a.latency_ms <= b.latency_ms
                    and a.size_mb <= b.size_mb)
        better = (a.validation_macro_f1 > b.validation_macro_f1 or a.latency_ms < b.latency_ms
                  or a.size_mb < b.size_mb)
        return no_worse and better

    return sorted(o.number for o in complete if not any(dominates(other, o) for other in complete))


def describe_gap(goal: str, outcome: Outcome, goals: SearchGoals) -> str:
    """E.g. "retention 0.982, 0.008 short of 0.99"."""
    target = getattr(goals, goal)
    gap = shortfalls(outcome, goals)[goal]
    if goal == "min_retention":
        text = f"retention {outcome.retention:.3f}"
        return f"{text}, meets {target:g}" if gap == 0 else f"{text}, {gap:.3f} short of {target:g}"
    if goal == "max_latency_ms":
        text = f"p50 {outcome.latency_ms:.3f} ms"
        return f"{text}, meets {target:g} ms" if gap == 0 else f"{text}, {gap:.3f} ms over {target:g} ms"
    text = f"size {outcome.size_mb:.2f} MB"
    return f"{text}, meets {target:g} MB" if gap == 0 else f"{text}, {gap:.2f} MB over {target:g} MB"


def closest(outcomes: list[Outcome], goals: SearchGoals) -> dict[str, Any]:
    """When no trial meets every goal: per goal the trial closest to it, and the trial closest overall
    (smallest sum of shortfalls relative to each goal)."""
    complete = [o for o in outcomes if o.complete]
    if not complete:
        return {}
    per_goal = {}
    for goal, _, _ in GOAL_AXES:
        if getattr(goals, goal) is None:
            continue
        nearest = min(complete, key=lambda o: (shortfalls(o, goals)[goal], o.number))
        per_goal[goal] = {"trial": nearest.number, "distance": shortfalls(nearest, goals)[goal],
                          "text": describe_gap(goal, nearest, goals)}

    def relative(o: Outcome) -> float:
        return sum(gap / getattr(goals, goal) for goal, gap in shortfalls(o, goals).items())

    overall = min(complete, key=lambda o: (relative(o), o.number))
    return {
        "per_goal": per_goal,
        "overall": {"trial": overall.number, "relative_distance": relative(overall),
                    "gaps": [describe_gap(goal, overall, goals) for goal in shortfalls(overall, goals)]},
    }
