"""Logit distillation (Hinton et al.): the student matches the teacher's temperature-softened
distribution, weighted by alpha against the hard-label cross-entropy."""

from __future__ import annotations

from typing import Any

from pipeline.config import Params
from pipeline.stage import main
from pipeline.students import train_student

STAGE = "distill_vanilla"


def run(params: Params) -> dict[str, Any]:
    """Read paths.teacher, write paths.student_vanilla."""
    return train_student(params, STAGE, params.paths.student_vanilla, terms=params.distill_vanilla)


if __name__ == "__main__":
    main(run, stage=STAGE, member="student_vanilla", sections=("student", STAGE))
