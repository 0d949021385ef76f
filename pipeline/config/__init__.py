"""Typed, validated parameters.

`params.yaml` is the single source of every knob; it is loaded into the frozen pydantic models of this
package. Their defaults are the values params.yaml ships with (tests/test_config.py fails if the two
differ), so a params file that leaves a key out means the same as the shipped one.
An unknown key, a wrong type or an out-of-range value fails before any work starts, with a message
naming the key and what is allowed. Section names match the DVC stages that read them (`data` and
`teacher` are read by `prepare_data` and `train_teacher`; `student` is shared by the three student
stages so their architecture and budget are identical by construction).

The section schemas live in one module per group of sections (base, data, teacher, students,
compression, evaluation, orchestration, search); this module only assembles them into `Params` and
loads params files. The split is what DVC sees: each stage depends on the schema modules of the
sections it reads (scripts/dvc_deps.py), not on this aggregator, so editing a student section's schema
never re-trains the teacher. New code imports a section class from its module; the re-exports below
keep `from pipeline.config import TeacherConfig` working.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipeline.config.base import Paths, Section, ShortLatency, TrainingBudget
from pipeline.config.baselines import BaselinesConfig, StaticBaselineConfig, TfidfBaselineConfig
from pipeline.config.compression import ExportOnnxConfig, PruneConfig, QuantizeConfig, RecoveryConfig
from pipeline.config.data import DEMO_PATH, DataConfig, TaskConfig, TransferConfig
from pipeline.config.evaluation import BenchmarkConfig, EvaluationConfig, ReportConfig, SLAConfig
from pipeline.config.orchestration import FlowConfig, TrackingConfig
from pipeline.config.search import (
    CATEGORICAL_DIMENSIONS,
    INTEGER_DIMENSIONS,
    KD_METHODS,
    Choices,
    Range,
    Scalar,
    SearchBudget,
    SearchConfig,
    SearchGoals,
    SearchSpace,
)
from pipeline.config.students import DistillIntermediateConfig, DistillVanillaConfig, KDTerms, StudentConfig
from pipeline.config.teacher import TeacherConfig, VerifyTeacherConfig
from pipeline.errors import ConfigError

__all__ = [
    "CATEGORICAL_DIMENSIONS", "DEFAULT_PARAMS_FILE", "DEMO_PATH", "INTEGER_DIMENSIONS", "KD_METHODS",
    "BaselinesConfig", "BenchmarkConfig", "Choices", "ConfigError", "DataConfig", "DistillIntermediateConfig", "DistillVanillaConfig",
    "EvaluationConfig", "ExportOnnxConfig", "FlowConfig", "KDTerms", "Params", "Paths", "PruneConfig",
    "QuantizeConfig", "Range", "RecoveryConfig", "ReportConfig", "SLAConfig", "Scalar", "SearchBudget",
    "SearchConfig", "SearchGoals", "SearchSpace", "Section", "ShortLatency", "StaticBaselineConfig", "StudentConfig",
    "TaskConfig", "TeacherConfig", "TfidfBaselineConfig", "TrackingConfig", "TrainingBudget", "TransferConfig",
    "VerifyTeacherConfig",
    "load_params", "params_from_dict", "parse_override",
]

DEFAULT_PARAMS_FILE = "params.yaml"


class Params(Section):
    paths: Paths = Paths()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    transfer: TransferConfig = TransferConfig()
    teacher: TeacherConfig = TeacherConfig()
    verify_teacher: VerifyTeacherConfig = VerifyTeacherConfig()
    student: StudentConfig = StudentConfig()
    distill_vanilla: DistillVanillaConfig = DistillVanillaConfig()
    distill_intermediate: DistillIntermediateConfig = DistillIntermediateConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    export_onnx: ExportOnnxConfig = ExportOnnxConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    report: ReportConfig = ReportConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    flow: FlowConfig = FlowConfig()
    search: SearchConfig = SearchConfig()
    # The directory relative paths are resolved against (the params file's directory).
    root: Path = Field(default_factory=Path.cwd, exclude=True)

    def path(self, relative: str) -> Path:
        """Resolve a path from params against the project root."""
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data (for logging it to MLflow)."""
        return getattr(self, name).model_dump(mode="json")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`teacher.epochs=1` -> ("teacher.epochs", 1); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. teacher.epochs=1")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({problem}); quote it, e.g. {key.strip()}='\"...\"'"
        ) from None


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; params.yaml lists every allowed key)"
        value = item.get("input")
        shown = "" if item["type"] == "extra_forbidden" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def params_from_dict(tree: dict[str, Any], root: Path | None = None, source: str = "params") -> Params:
    try:
        return Params.model_validate({**tree, "root": root or Path.cwd()})
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                continue  # SafeLoader itself reports unhashable keys
            if key in seen:
                raise ConfigError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (first on line "
                    f"{seen[key]}); the second would silently replace the first. Merge them into one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS_FILE, overrides: list[str] = ()) -> Params:
    """Load and validate params.yaml, applying `key=value` overrides on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path.resolve()}; run from the project root or pass --params")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    return params_from_dict(tree, root=path.resolve().parent, source=str(path))
