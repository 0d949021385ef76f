"""Intermediate-layer distillation (TinyBERT-style): the vanilla terms plus hidden-state and
attention-map MSE over mapped layers, padding masked out."""

from __future__ import annotations

from typing import Any

from pipeline.config import Params
from pipeline.kd.students import train_student
from pipeline.not_built import mark_not_built
from pipeline.stage import Stage
from pipeline.training import results


def run(params: Params) -> dict[str, Any]:
    """Read paths.teacher, write paths.student_intermediate."""
    if not params.distill_intermediate.enabled:
        # An empty curve: the report draws no panel for it (as for a prune that trained nothing).
        results.write_curve([], params.path(params.paths.curves) / f"{STAGE.name}.csv")
        return mark_not_built(params.path(params.paths.student_intermediate), "distill_intermediate.enabled is false")
    return train_student(params, STAGE.name, STAGE.member, params.paths.student_intermediate, terms=params.distill_intermediate)


STAGE = Stage("distill_intermediate", run, member="student_intermediate", sections=("student", "distill_intermediate"),
              outputs=("student_intermediate", "curves", "checkpoints"))

if __name__ == "__main__":
    STAGE.main()
