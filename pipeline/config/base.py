"""The base of every params section (frozen, unknown keys refused), the training budget the teacher and
the students share, and the project's paths."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    prepared: str = "data/prepared"
    teacher: str = "models/teacher"
    student_baseline: str = "models/student_baseline"
    student_vanilla: str = "models/student_vanilla"
    student_intermediate: str = "models/student_intermediate"
    pruned: str = "models/student_pruned"
    quantized: str = "models/student_int8_torch"
    onnx_student: str = "models/student_onnx"
    onnx_teacher: str = "models/teacher_onnx"
    # The reference members (stages baseline_tfidf, baseline_static).
    baseline_tfidf: str = "models/baseline_tfidf"
    baseline_static: str = "models/baseline_static"
    # New unlabelled texts made from the training and transfer texts (stage augment).
    augmented: str = "data/augmented"
    # The verified teacher's logits on the train split and the transfer texts (stage teacher_logits).
    teacher_logits: str = "models/teacher_logits"
    metrics: str = "reports/metrics"
    curves: str = "reports/curves"
    benchmark: str = "reports/benchmark.json"
    reports: str = "reports"
    # Trainer checkpoints (scratch space for resuming killed runs; not a DVC output).
    checkpoints: str = ".cache/checkpoints"


class ShortLatency(Section):
    """A short benchmark run, side by side when several models are timed (batch 1, 1 thread,
    validation texts): a search trial's, or the export's choice between INT8 variants."""

    min_runs: int = Field(100, ge=1)
    min_seconds: float = Field(2.0, ge=0)
    warmup_runs: int = Field(10, ge=0)
    rounds: int = Field(2, ge=1)


class TrainingBudget(Section):
    epochs: float = Field(4, gt=0, le=1000)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(128, ge=1, le=4096)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, lt=1)
    seed: int = 42
    # Save a resumable Trainer checkpoint every this many optimizer steps (0: only at epoch ends).
    save_steps: int = Field(0, ge=0)
    # auto: mixed precision on CUDA (bf16, else fp16), fp32 on a CPU | fp32 | bf16 (mixed, fp32 weights;
    # needs AMX or AVX512_BF16 on a CPU, where it is not always faster: pipeline/training/precision.py).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
