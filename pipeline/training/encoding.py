"""Text to model inputs for every training stage: tokenized splits and the collator that pads them and
passes the teacher's precomputed float columns through."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from pipeline.data import labels as label_utils
from pipeline.data.prepared import Prepared

# Columns our collator passes through untouched: float targets precomputed from the teacher (logits;
# pooled hidden states for a student with its own tokenizer), and `has_label` (0 for a transfer text,
# whose label is a placeholder the hard-label term must skip).
EXTRA_FLOAT_COLUMNS = ("teacher_logits", "teacher_pooled", "has_label")
# A row's place in the teacher's cached per-token internals (pipeline/kd/teacher_internals.py), passed through as an integer.
ROW_COLUMN = "teacher_row"


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
        rows = [feature.pop(ROW_COLUMN) for feature in features] if ROW_COLUMN in features[0] else None
        batch = self.pad(features)
        batch.update(extra)
        if rows is not None:
            batch[ROW_COLUMN] = torch.tensor(rows, dtype=torch.long)
        return batch
