"""One way to evaluate and record a model.

Every stage that writes a model (teacher, students, pruned, torch INT8, ONNX) evaluates it on the
validation and test splits with `evaluate_and_record`, which writes one typed `ModelRecord` as
`checkpoint_info.json` beside it. The report reads that schema and nothing else, and every number has
one name: `record.test["macro_f1"]` in the file is `test_macro_f1` in the stage's metrics, MLflow and
the report (a stage that writes several members nests each member's metrics under its name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.config.evaluation import EvaluationConfig
from pipeline.data.prepared import Prepared
from pipeline.errors import ModelError
from pipeline.evaluation.metrics import evaluate_logits, summary
from pipeline.io import read_json, write_json

INFO_FILE = "checkpoint_info.json"

LogitsFn = Callable[[list[str]], np.ndarray]


class ModelRecord(BaseModel):
    """checkpoint_info.json: what a model directory holds and how well it does."""

    model_config = ConfigDict(extra="forbid")

    member: str  # its name in the family (teacher, student_vanilla, student_onnx_int8, ...)
    stage: str  # the stage that wrote it
    source: str | None = None  # the model it was made from (a path from params), None for the teacher's base
    label_names: list[str]
    task_type: str
    max_length: int
    num_parameters: int  # of the PyTorch model (quantized and ONNX members: of their fp32 source)
    size_mb: float  # the weight files on disk
    data_hash: str
    validation: dict[str, Any]
    test: dict[str, Any] | None = None  # None only in a search's view of the data, which withholds test
    params: dict[str, Any] = {}  # the params sections that shaped it
    training_seconds: float | None = None
    details: dict[str, Any] = {}  # what only this kind of member has (KD terms, pruning plan, parity, ...)

    def metrics(self) -> dict[str, Any]:
        """The flat numbers for DVC and MLflow: validation_*, test_*, the CI bounds, size, parameters."""
        flat: dict[str, Any] = {**summary(self.validation, "validation")}
        if self.test is not None:
            flat.update({
                **summary(self.test, "test"),
                "test_macro_f1_ci95_low": self.test["macro_f1_ci95"][0],
                "test_macro_f1_ci95_high": self.test["macro_f1_ci95"][1],
            })
        flat.update({"num_parameters": self.num_parameters, "size_mb": self.size_mb})
        if self.training_seconds is not None:
            flat["training_seconds"] = self.training_seconds
        return flat

    def write(self, model_dir: Path) -> Path:
        path = Path(model_dir) / INFO_FILE
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, model_dir: Path) -> ModelRecord:
        path = Path(model_dir) / INFO_FILE
        if not path.is_file():
            raise ModelError(f"{path} not found; run the stage that writes {Path(model_dir).name} (dvc repro)")
        try:
            return cls.model_validate(read_json(path))
        except ValueError as error:
            raise ModelError(
                f"{path} is not a checkpoint record this version understands ({str(error)[:300]}); "
                "re-run the stage that wrote it (dvc repro)"
            ) from None


def evaluate_splits(
    logits_fn: LogitsFn,
    prepared: Prepared,
    evaluation: EvaluationConfig,
    thresholds: float | Sequence[float] = 0.5,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Metrics and logits of a model on validation and test (validation only when `prepared` withholds
    test); `logits_fn` maps texts to logits."""
    results, logits = {}, {}
    for split in prepared.evaluated_splits:
        logits[split] = np.asarray(logits_fn(prepared.texts(split)), dtype=np.float32)
        results[split] = evaluate_logits(
            logits[split], prepared.labels(split), prepared.label_names, prepared.task_type, evaluation, thresholds
        )
    return results, logits


def evaluate_and_record(
    logits_fn: LogitsFn, prepared: Prepared, evaluation: EvaluationConfig, out_dir: Path, **fields: Any
) -> tuple[ModelRecord, dict[str, np.ndarray]]:
    """Evaluate a model on validation and test (see evaluate_splits) and write its record into `out_dir` (the model's
    directory, normally the temporary one a stage fills before renaming it into place); `fields` are
    those of `evaluate_record`.

    Returns the record and the logits per split (for the parity checks of the stages that need them).
    """
    record, logits = evaluate_record(logits_fn, prepared, evaluation, **fields)
    record.write(out_dir)
    return record, logits


def evaluate_record(
    logits_fn: LogitsFn,
    prepared: Prepared,
    evaluation: EvaluationConfig,
    *,
    member: str,
    stage: str,
    max_length: int,
    num_parameters: int,
    size_mb: float,
    thresholds: float | Sequence[float] = 0.5,
    source: str | None = None,
    params: dict[str, Any] | None = None,
    training_seconds: float | None = None,
    details: dict[str, Any] | None = None,
) -> tuple[ModelRecord, dict[str, np.ndarray]]:
    """Evaluate a model on validation and test (see evaluate_splits) and build its record, without
    writing it: for a stage that adds to the record (e.g. parity checks) before writing it once.

    Returns the record and the logits per split.
    """
    results, logits = evaluate_splits(logits_fn, prepared, evaluation, thresholds)
    record = ModelRecord(
        member=member,
        stage=stage,
        source=source,
        label_names=prepared.label_names,
        task_type=prepared.task_type,
        max_length=max_length,
        num_parameters=num_parameters,
        size_mb=round(size_mb, 3),
        data_hash=prepared.content_hash,
        validation=results["validation"],
        test=results.get("test"),
        params=params or {},
        training_seconds=None if training_seconds is None else round(training_seconds, 1),
        details=details or {},
    )
    return record, logits
