"""The verified teacher's logits, computed once (stage teacher_logits) on the teacher's own
tokenization for the train split and the transfer texts, and reused by the KD students and the
pruning recovery.

On disk (`paths.teacher_logits`): `<split>.npy` (float32 [texts, labels], plain numpy format, read
without pickle) and `index.json`, which records per split the number of texts and a hash of the
texts in order, the token length and the teacher's weights fingerprint, so a reader refuses logits
that belong to other texts or another teacher instead of silently training on them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline import training
from pipeline.distill import KDLoss, compute_teacher_logits
from pipeline.errors import DataError
from pipeline.io import read_json, write_json
from pipeline.prepared import Prepared

CACHED_SPLITS = ("train", "transfer")
INDEX_FILE = "index.json"


def texts_sha256(texts: list[str]) -> str:
    """One hash of the texts in order (a reordered or edited list hashes differently)."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def compute(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> np.ndarray:
    """The teacher's logits for `texts`, tokenized and batched exactly as the students' training split."""
    dataset = training.encode_texts(texts, tokenizer, max_length)
    return compute_teacher_logits(teacher, dataset, training.Collator(tokenizer)).numpy()


def save(out_dir: Path, texts: dict[str, list[str]], logits: dict[str, np.ndarray], max_length: int, teacher_fingerprint: str) -> None:
    """Write `<split>.npy` per split and the index describing what they were computed on."""
    index: dict[str, Any] = {"max_length": max_length, "teacher_fingerprint": teacher_fingerprint, "splits": {}}
    for split, values in logits.items():
        np.save(out_dir / f"{split}.npy", values.astype(np.float32), allow_pickle=False)
        index["splits"][split] = {"rows": len(texts[split]), "texts_sha256": texts_sha256(texts[split])}
    write_json(out_dir / INDEX_FILE, index)


def load(directory: Path, split: str, texts: list[str], max_length: int, teacher_fingerprint: str) -> np.ndarray:
    """The cached logits of `split`, after checking they were computed on these texts, in this order,
    at this token length, by this teacher."""
    rerun = "re-run the teacher_logits stage (dvc repro teacher_logits, or python -m stages.teacher_logits)"
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise DataError(f"{index_path} not found: the teacher's logits are not computed yet; {rerun}")
    index = read_json(index_path)
    entry = index["splits"].get(split)
    if entry is None:
        raise DataError(f"{directory} has no teacher logits for the {split} texts; {rerun}")
    stale = []
    if entry["rows"] != len(texts) or entry["texts_sha256"] != texts_sha256(texts):
        stale.append(f"they were computed on {entry['rows']} other {split} texts (now {len(texts)}, or reordered/edited)")
    if index["max_length"] != max_length:
        stale.append(f"at max_length {index['max_length']}, not task.max_length={max_length}")
    if index["teacher_fingerprint"] != teacher_fingerprint:
        stale.append("by a teacher with other weights")
    if stale:
        raise DataError(f"the cached teacher logits in {directory} are stale: " + "; ".join(stale) + f". {rerun}")
    values = np.load(directory / f"{split}.npy", allow_pickle=False)
    if values.shape[0] != len(texts):
        raise DataError(f"{directory / f'{split}.npy'} has {values.shape[0]} rows for {len(texts)} texts; {rerun}")
    return values


def kd_train_dataset(
    train: Dataset,
    prepared: Prepared,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    kd: KDLoss,
    cache_dir: Path,
    teacher_fingerprint: str,
) -> Dataset:
    """What a KD stage trains on: the labelled train split (encoded, in prepared order) and, when the
    prepared data has transfer texts, those texts with `has_label` 0 (KD terms only). When the terms
    read only the teacher's logits they come from the cache; terms that read the teacher's internals
    run it live on the same tokens. A section without a teacher term (the baseline) gets `train` as is.
    """
    if not kd.needs_teacher:
        return train
    cached = not kd.needs_internals
    if cached:
        logits = load(cache_dir, "train", prepared.texts("train"), max_length, teacher_fingerprint)
        train = train.add_column("teacher_logits", logits.tolist())
    transfer = prepared.transfer_texts()
    if not transfer:  # no has_label column: the loss is computed exactly as without a transfer set
        return train
    extra = training.encode_texts(transfer, tokenizer, max_length)
    first = train[0]["labels"]
    placeholder = 0 if isinstance(first, int) else [0] * len(first)
    extra = extra.add_column("labels", [placeholder] * len(extra))
    if cached:
        logits = load(cache_dir, "transfer", transfer, max_length, teacher_fingerprint)
        extra = extra.add_column("teacher_logits", logits.tolist())
    train = train.add_column("has_label", [1] * len(train))
    extra = extra.add_column("has_label", [0] * len(extra))
    return concatenate_datasets([train, extra.select_columns(train.column_names).cast(train.features)])
