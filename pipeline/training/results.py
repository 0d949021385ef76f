"""What a training stage writes when it is done: the trained model with its evaluated record (and, for
multi-label, its tuned thresholds), and the per-epoch loss curve for DVC plots and MLflow."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from pipeline.config import Params
from pipeline.config.data import TaskConfig
from pipeline.data.prepared import Prepared
from pipeline.evaluation.record import ModelRecord, evaluate_and_record
from pipeline.io import write_text_atomic


def store_tuned_thresholds(model: PreTrainedModel, task: TaskConfig, logits_fn, prepared: Prepared) -> float | list[float]:
    """The decision thresholds to evaluate `model` with. Multi-label with task.tune_thresholds: one per
    label, tuned on validation and STORED in model.config.label_thresholds, so the saved model, every
    later stage, ONNX and predict decide alike. Otherwise the thresholds the model already carries."""
    if task.type == "multi_label" and task.tune_thresholds:
        from pipeline.data.labels import sigmoid
        from pipeline.data.multilabel import tune_thresholds

        validation = logits_fn(prepared.texts("validation"))
        model.config.label_thresholds = tune_thresholds(sigmoid(validation), prepared.labels("validation").astype(int))
        return model.config.label_thresholds
    from pipeline.models import decision_thresholds

    return decision_thresholds(model, task.threshold)


def save_trained(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    prepared: Prepared,
    params: Params,
    /,
    **record: Any,
) -> ModelRecord | None:
    """Write the trained (best) model atomically with its evaluated record (`record`: the
    ModelRecord fields the stage knows, e.g. member, stage, source, details). Only the main process
    writes; the others return None."""
    from pipeline.io import atomic_dir
    from pipeline.models import count_parameters, logits_fn, save_model, weights_size_mb

    if not trainer.is_world_process_zero():
        return None
    model = trainer.model.eval()
    predict = logits_fn(model, tokenizer, params.task.max_length)
    thresholds = store_tuned_thresholds(model, params.task, predict, prepared)
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        saved, _ = evaluate_and_record(
            predict, prepared, params.evaluation, tmp, max_length=params.task.max_length,
            num_parameters=count_parameters(model), size_mb=weights_size_mb(tmp), thresholds=thresholds, **record,
        )
    return saved


def curve_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logging point, merging the training and evaluation entries of that step."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "step" not in entry or "train_runtime" in entry:
            continue
        row = rows.setdefault(entry["step"], {"step": entry["step"]})
        for key, value in entry.items():
            if key in ("step", "total_flos") or key.endswith(("_runtime", "_per_second")):
                continue
            if key == "loss":
                key = "train_loss"
            if isinstance(value, (int, float)):
                row[key] = round(float(value), 6)
    ordered = [rows[step] for step in sorted(rows)]
    return [row for row in ordered if len(row) > 2]


def write_curve(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = [columns] + [[row.get(column, "") for column in columns] for row in rows]
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    write_text_atomic(path, buffer.getvalue())


def record_curve(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write the per-epoch curve (see curve_rows) as a CSV (a DVC plot) and log it to MLflow."""
    from pipeline import tracking

    write_curve(rows, path)
    for row in rows:
        tracking.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=int(row["step"]))
    tracking.log_artifact(path, "curves")
    return rows
