"""The control: the student trained on hard labels only, with the same architecture, initialisation
and budget as the distilled students. Without it no comparison of distillation is honest."""

from __future__ import annotations

from typing import Any

from pipeline.config import Params
from pipeline.stage import main
from pipeline.students import train_student

STAGE = "student_baseline"


def run(params: Params) -> dict[str, Any]:
    """Read paths.teacher (for the initial weights only), write paths.student_baseline."""
    return train_student(params, STAGE, params.paths.student_baseline, terms=None)


if __name__ == "__main__":
    main(run, stage=STAGE, member=STAGE, sections=("student",))
