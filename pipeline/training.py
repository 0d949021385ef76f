"""What every training stage shares: encoding the splits, Trainer arguments, metrics during training,
resumable checkpoints, and the loss curve written for DVC plots and MLflow."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from pipeline.config import Params
from pipeline.config.base import TrainingBudget
from pipeline.config.data import TaskConfig
from pipeline.data import labels as label_utils
from pipeline.data.prepared import Prepared
from pipeline.errors import ConfigError
from pipeline.evaluation.metrics import macro_f1
from pipeline.evaluation.record import ModelRecord, evaluate_and_record
from pipeline.io import write_text_atomic

log = logging.getLogger(__name__)

# Columns our collator passes through untouched: float targets precomputed from the teacher (logits;
# pooled hidden states for a student with its own tokenizer), and `has_label` (0 for a transfer text,
# whose label is a placeholder the hard-label term must skip).
EXTRA_FLOAT_COLUMNS = ("teacher_logits", "teacher_pooled", "has_label")


def encode(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_names: list[str],
    task_type: str,
) -> Dataset:
    """Tokenize prepared rows into a Dataset with input ids, attention mask and `labels`."""
    labels = [label_utils.encode(row["label"], label_names, task_type) for row in rows]
    dataset = Dataset.from_dict({"text": [row["text"] for row in rows], "labels": labels})

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return dataset.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")


def encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Tokenize unlabelled texts (as `encode` does) into a Dataset with input ids and attention mask."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return Dataset.from_dict({"text": list(texts)}).map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")


def encode_splits(
    prepared: Prepared, tokenizer: PreTrainedTokenizerBase, max_length: int, splits: tuple[str, ...] = ("train", "validation")
) -> dict[str, Dataset]:
    """The prepared splits a Trainer needs, tokenized."""
    return {
        split: encode(prepared.rows(split), tokenizer, max_length, prepared.label_names, prepared.task_type)
        for split in splits
    }


class Collator:
    """Dynamic padding, plus stacking of the precomputed float columns (teacher logits)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [dict(feature) for feature in features]
        extra = {
            key: torch.tensor([feature.pop(key) for feature in features], dtype=torch.float32)
            for key in EXTRA_FLOAT_COLUMNS
            if key in features[0]
        }
        batch = self.pad(features)
        batch.update(extra)
        return batch


def compute_metrics_fn(task_type: str, threshold: float = 0.5):
    def compute(eval_pred: Any) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = label_utils.decide(np.asarray(logits), task_type, threshold)
        labels = np.asarray(eval_pred.label_ids)
        accuracy = float((predictions == labels).all(axis=-1).mean()) if labels.ndim > 1 else float(
            (predictions == labels).mean()
        )
        return {"macro_f1": macro_f1(labels.astype(int), predictions), "accuracy": accuracy}

    return compute


def training_arguments(budget: TrainingBudget, output_dir: Path, **overrides: Any) -> TrainingArguments:
    """Arguments shared by every training stage: keep the best checkpoint by validation macro-F1."""
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    # torchrun / accelerate launch without CUDA: unless use_cpu is set, accelerate leaves the run
    # undistributed and every rank silently trains on all the data; with it, ranks are DDP over gloo.
    cpu_ddp = not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
    cadence = "steps" if budget.save_steps else "epoch"
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=budget.epochs,
        learning_rate=budget.learning_rate,
        per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=budget.eval_batch_size,
        warmup_ratio=budget.warmup_ratio,
        weight_decay=budget.weight_decay,
        seed=budget.seed,
        data_seed=budget.seed,
        eval_strategy=cadence,
        save_strategy=cadence,
        logging_strategy=cadence,
        eval_steps=budget.save_steps or None,
        save_steps=budget.save_steps or 500,
        logging_steps=budget.save_steps or 500,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        save_total_limit=2,  # the best and the latest (for resuming)
        save_only_model=False,
        report_to="none",  # stages log to MLflow themselves, one run per stage
        fp16=cuda and not bf16,  # AMP on CUDA; plain fp32 on the CPU
        bf16=bf16,
        # Length-grouped batches waste less on padding (it matters on a CPU), but their order comes
        # from the global RNG, so a run resumed mid-epoch would see other batches: with save_steps
        # (resumable runs) the seeded random sampler is used instead.
        group_by_length=not budget.save_steps,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,  # our collator needs teacher_logits
        label_names=["labels"],
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        use_cpu=cpu_ddp,
        ddp_backend="gloo" if cpu_ddp else None,
    )
    args.update(overrides)
    return TrainingArguments(**args)


def pos_weight(task: TaskConfig, dataset: Dataset, label_names: list[str]) -> torch.Tensor | None:
    """Per-label BCE weight of positives (multi-label only), from params or the training split."""
    if task.type != "multi_label" or task.pos_weight == "none":
        return None
    if task.pos_weight == "auto":
        labels = np.asarray(dataset["labels"], dtype=np.float64)
        positives = labels.sum(axis=0)
        return torch.tensor((len(labels) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    if len(task.pos_weight) != len(label_names):
        raise ConfigError(
            f"task.pos_weight has {len(task.pos_weight)} values for {len(label_names)} labels {label_names}"
        )
    return torch.tensor(task.pos_weight, dtype=torch.float32)


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


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_dir(params: Params, stage: str, key: str) -> tuple[Path, str | None]:
    """The stage's Trainer scratch directory and the checkpoint to resume from, if any.

    A checkpoint is only resumed when it was written for the same params and data (`key`); otherwise
    the directory is cleared so a stale run can never leak into a new one.
    """
    directory = params.path(params.paths.checkpoints) / stage
    stamp = directory / "fingerprint.txt"
    matches = stamp.is_file() and stamp.read_text().strip() == key
    if int(os.environ.get("RANK", "0")) == 0:  # under DDP only rank 0 clears and stamps the directory
        if directory.exists() and not matches:
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key + "\n")
        for checkpoint in sorted(directory.glob("checkpoint-*")):
            if checkpoint.is_dir() and not complete_checkpoint(checkpoint):
                log.warning("removing the incomplete checkpoint %s (a run was stopped while writing it)", checkpoint)
                shutil.rmtree(checkpoint)
    last = get_last_checkpoint(str(directory)) if matches and directory.is_dir() else None
    if last:
        log.info("resuming from %s (written by an interrupted run with the same params)", last)
    return directory, last


def complete_checkpoint(checkpoint: Path) -> bool:
    """True when the Trainer state and the model weights of `checkpoint` exist and load."""
    from safetensors import safe_open

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        index = checkpoint / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "model.safetensors"
        ]
        for shard in shards:
            with safe_open(str(checkpoint / shard), framework="pt") as weights:
                weights.keys()  # opening checks the header against the file size: truncation fails
        return True
    except Exception:  # missing, truncated or unparsable (safetensors raises its own error type)
        return False


def train(trainer: Trainer, resume_from: str | None) -> float:
    """Train (resuming when a checkpoint is given); return the wall time in seconds."""
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    return time.perf_counter() - start


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


def finish(trainer: Trainer, directory: Path) -> None:
    """Remove the scratch checkpoints once the final model is safely written."""
    del trainer
    shutil.rmtree(directory, ignore_errors=True)


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


def record_curve(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write the per-epoch curve (see curve_rows) as a CSV (a DVC plot) and log it to MLflow."""
    from pipeline import tracking

    write_curve(rows, path)
    for row in rows:
        tracking.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=int(row["step"]))
    tracking.log_artifact(path, "curves")
    return rows
