"""The control: the student trained on hard labels only, with the same architecture, initialisation
and budget as the distilled students. Without it no comparison of distillation is honest."""

from __future__ import annotations

from typing import Any

from pipeline.config import Params
from pipeline.kd.students import train_student
from pipeline.stage import Stage


def run(params: Params) -> dict[str, Any]:
    """Read paths.teacher (for the initial weights only), write paths.student_baseline."""
    return train_student(params, STAGE.name, STAGE.member, params.paths.student_baseline, terms=None)


STAGE = Stage("student_baseline", run, member="student_baseline", sections=("student",),
              outputs=("student_baseline", "curves", "checkpoints"))

if __name__ == "__main__":
    STAGE.main()
