"""Logit distillation (Hinton et al.): the student matches the teacher's temperature-softened
distribution, weighted by alpha against the hard-label cross-entropy."""

from __future__ import annotations

from typing import Any

from pipeline.config import Params
from pipeline.kd.students import train_student
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Read paths.teacher, write paths.student_vanilla."""
    return train_student(params, STAGE.name, STAGE.member, params.paths.student_vanilla, terms=params.distill_vanilla)


STAGE = Stage("distill_vanilla", run, member="student_vanilla", sections=("student", "distill_vanilla"),
              outputs=("student_vanilla", "curves", "checkpoints"))

if __name__ == "__main__":
    STAGE.main()
