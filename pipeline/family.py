"""The model family: every member the pipeline builds, where it lives and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import Params

Kind = Literal["torch", "torch_int8", "onnx"]


@dataclass(frozen=True)
class Member:
    name: str
    kind: Kind  # how the benchmark loads it
    precision: Literal["fp32", "int8"]
    path: Path

    @property
    def format(self) -> str:
        return "onnx" if self.kind == "onnx" else "torch"


def family(params: Params) -> list[Member]:
    """Every family member in pipeline order; the PyTorch fp32 teacher (the reference) comes first."""
    p = params.paths
    onnx_student = params.path(p.onnx_student)
    return [
        Member("teacher", "torch", "fp32", params.path(p.teacher)),
        Member("teacher_onnx", "onnx", "fp32", params.path(p.onnx_teacher)),
        Member("student_baseline", "torch", "fp32", params.path(p.student_baseline)),
        Member("student_vanilla", "torch", "fp32", params.path(p.student_vanilla)),
        Member("student_intermediate", "torch", "fp32", params.path(p.student_intermediate)),
        Member("student_pruned", "torch", "fp32", params.path(p.pruned)),
        Member("student_int8_torch", "torch_int8", "int8", params.path(p.quantized)),
        Member("student_onnx_fp32", "onnx", "fp32", onnx_student / "fp32"),
        Member("student_onnx_int8", "onnx", "int8", onnx_student / "int8"),
    ]


REFERENCE = "teacher"
