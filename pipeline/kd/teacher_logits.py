"""The verified teacher's logits, computed once (stage teacher_logits) on the teacher's own
tokenization for the train split and the transfer texts, and reused by the KD students and the
pruning recovery.

When a student has its own tokenizer (a pretrained `student.init` whose tokenizer differs from the
teacher's), the same forward pass also keeps the teacher's mean-pooled hidden states of its layers
(`pooled_layers`, 0 being the embedding output; the stage caches all of them): the targets of
`PooledHiddenMSE`, so the teacher never runs per training step.

On disk (`paths.teacher_logits`): `<split>.npy` (float32 [texts, labels], plain numpy format, read
without pickle), optionally `<split>.pooled.npy` (float16 [texts, pooled layers, teacher hidden]:
half the size, and far finer than an MSE target needs) and `index.json`, which records per split the
number of texts and a hash of the texts in order, the token length, the pooled layers and the
teacher's weights fingerprint, so a reader refuses values that belong to other texts, other layers
or another teacher instead of silently training on them. Rows follow the order of the texts: a
student's row i (prepared order) gets the teacher's values for the same text i.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.errors import DataError
from pipeline.io import read_json, sha256_file, write_json
from pipeline.kd.teacher_internals import Collector, InternalsStore
from pipeline.kd.terms import mean_pool
from pipeline.kd.texts import PARTS, KDTexts
from pipeline.training import encoding
from pipeline.training.loss import KDLoss
from pipeline.training.precision import Precision, autocast

INDEX_FILE = "index.json"
POOLED_SUFFIX = ".pooled.npy"
POOLED_DTYPE = np.float16
RERUN = "rebuild it: dvc repro -f teacher_logits (or python -m stages.teacher_logits)"


# --------------------------------------------------------------------------- computing the outputs


def precompute_teacher_logits(teacher: PreTrainedModel, dataset, collator, batch_size: int = 128):
    """The dataset with the teacher's logits of every example as a `teacher_logits` column."""
    return dataset.add_column("teacher_logits", compute_teacher_logits(teacher, dataset, collator, batch_size).tolist())


def compute_teacher_logits(teacher: PreTrainedModel, dataset, collator, batch_size: int = 128) -> torch.Tensor:
    """The teacher's logits (float32) for every example, in dataset order."""
    return compute_teacher_outputs(teacher, dataset, collator, batch_size)[0]


@torch.no_grad()
def compute_teacher_outputs(
    teacher: PreTrainedModel, dataset, collator, batch_size: int = 128, pooled_layers: Sequence[int] = (),
    internals: Collector | None = None, precision: Precision = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits (float32) for every example, in dataset order, and, when `pooled_layers`
    are given (0: the embedding output), its mean-pooled hidden states of those layers
    [examples, layers, hidden] (float32), from the same forward pass; `internals` collects its
    per-token hidden states and attention maps too (in batch order: `internals.order` puts them back).
    Batches are formed from examples sorted by length (little padding: about half the work on short
    texts of mixed length; padding never changes an example's outputs), and the rows are put back in
    dataset order. `precision`: bf16 / fp16 run the teacher under autocast (the values are returned in fp32)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    teacher.eval()
    device = next(teacher.parameters()).device
    columns = [c for c in dataset.column_names if c not in ("labels", *encoding.EXTRA_FLOAT_COLUMNS, encoding.ROW_COLUMN)]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    loader = DataLoader(dataset.select_columns(columns).select(by_length), batch_size=batch_size, collate_fn=collator)
    chunks, pooled_chunks = [], []
    for batch in tqdm(loader, desc="teacher outputs", unit="batch", leave=False):
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast(precision, device):
            outputs = teacher(**batch, output_hidden_states=bool(pooled_layers) or internals is not None,
                              output_attentions=internals is not None)
        chunks.append(outputs.logits.float().cpu())
        mask = batch["attention_mask"]
        if internals is not None:
            internals.add(outputs, mask)
        if pooled_layers:
            pooled_chunks.append(
                torch.stack([mean_pool(outputs.hidden_states[layer].float(), mask) for layer in pooled_layers], dim=1).cpu()
            )
    order = torch.tensor(by_length).argsort()  # each row's position in the sorted batches
    if internals is not None:
        internals.order = order.tolist()
    return torch.cat(chunks)[order], (torch.cat(pooled_chunks)[order] if pooled_layers else None)


# --------------------------------------------------------------------------- the cache


def texts_sha256(texts: list[str]) -> str:
    """One hash of the texts in order (a reordered or edited list hashes differently)."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def compute(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    pooled_layers: Sequence[int] = (),
    internals: Collector | None = None,
    precision: Precision = "fp32",
) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's logits for `texts`, tokenized and batched exactly as the students' training split,
    and its mean-pooled hidden states of `pooled_layers` (None when no layer is asked for); `internals`
    collects its per-token states and maps; `precision` as in `compute_teacher_outputs`."""
    dataset = encoding.encode_texts(texts, tokenizer, max_length)
    logits, pooled = compute_teacher_outputs(
        teacher, dataset, encoding.Collator(tokenizer), pooled_layers=pooled_layers, internals=internals,
        precision=precision,
    )
    return logits.numpy(), (None if pooled is None else pooled.numpy())


def save(
    out_dir: Path,
    texts: dict[str, list[str]],
    logits: dict[str, np.ndarray],
    max_length: int,
    teacher_fingerprint: str,
    pooled: dict[str, np.ndarray] | None = None,
    pooled_layers: Sequence[int] = (),
) -> None:
    """Write `<split>.npy` (and `<split>.pooled.npy`) per split and the index describing what they
    were computed on."""
    index: dict[str, Any] = {"max_length": max_length, "teacher_fingerprint": teacher_fingerprint, "splits": {}}
    if pooled:
        index["pooled_layers"] = list(pooled_layers)
    # The SHA-256 of every file as written: a reader refuses a file changed afterwards (same shape or not).
    index["files"] = {}
    for split, values in logits.items():
        files = {f"{split}.npy": values.astype(np.float32)}
        if pooled:
            files[f"{split}{POOLED_SUFFIX}"] = pooled[split].astype(POOLED_DTYPE)
        for name, array in files.items():
            np.save(out_dir / name, array, allow_pickle=False)
            index["files"][name] = sha256_file(out_dir / name)
        index["splits"][split] = {"rows": len(texts[split]), "texts_sha256": texts_sha256(texts[split])}
    write_json(out_dir / INDEX_FILE, index)


def load(directory: Path, split: str, texts: list[str], max_length: int, teacher_fingerprint: str) -> np.ndarray:
    """The cached logits of `split`, after checking they were computed on these texts, in this order,
    at this token length, by this teacher."""
    index = check_index(directory, split, texts, max_length, teacher_fingerprint)
    return _rows(directory / f"{split}.npy", texts, index)


def load_pooled(
    directory: Path, split: str, texts: list[str], max_length: int, teacher_fingerprint: str, layers: Sequence[int]
) -> np.ndarray:
    """The teacher's cached mean-pooled hidden states of `layers` (in that order) for `split`
    (float32 [texts, layers, hidden]), checked as `load` checks the logits."""
    index = check_index(directory, split, texts, max_length, teacher_fingerprint)
    cached = index.get("pooled_layers", [])
    missing = [layer for layer in layers if layer not in cached]
    if missing:
        raise DataError(
            f"{directory} has no pooled hidden states of teacher layers {missing} (cached: {cached}); a student "
            "with its own tokenizer reads them for its hidden-state term, and the stage caches every layer of the "
            f"teacher it was given, so this cache belongs to another teacher or an older version: {RERUN}"
        )
    # Memory-mapped: a student reads a few of the cached layers, not all of them.
    values = _rows(directory / f"{split}{POOLED_SUFFIX}", texts, index, mmap=True)
    return values[:, [cached.index(layer) for layer in layers]].astype(np.float32)


def _rows(path: Path, texts: list[str], index: dict[str, Any], mmap: bool = False) -> np.ndarray:
    """The array in `path`, after checking it is the file the stage wrote (its SHA-256 in the index),
    that it has a row per text and that every value is finite."""
    if not path.is_file():
        raise DataError(f"{path} not found; {RERUN}")
    if sha256_file(path) != index["files"].get(path.name):
        raise DataError(
            f"{path} is not the file the teacher_logits stage wrote (its SHA-256 differs from the one recorded "
            f"in {INDEX_FILE}): it was changed or corrupted afterwards; {RERUN}"
        )
    values = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    if values.shape[0] != len(texts):
        raise DataError(f"{path} has {values.shape[0]} rows for {len(texts)} texts; {RERUN}")
    bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
    if bad:
        raise DataError(f"{path} holds non-finite values (NaN or infinity) in {bad} of {len(values)} rows; {RERUN}")
    return values


def check_index(directory: Path, split: str, texts: list[str], max_length: int, teacher_fingerprint: str) -> dict[str, Any]:
    """The cache's index, after checking `split` was computed on these texts, in this order, at this
    token length, by this teacher; a stale cache is an error."""
    rerun = RERUN
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise DataError(f"{index_path} not found: the teacher's logits are not computed yet; {rerun}")
    try:
        index = read_json(index_path)
        entry = index["splits"].get(split)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{index_path} is unreadable or not a teacher_logits index; {rerun}") from None
    if "files" not in index:
        raise DataError(f"{index_path} was written by an older version (no file digests to check the cache "
                        f"against); {rerun}")
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
    return index


def kd_train_dataset(
    train: Dataset,
    texts: KDTexts,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    kd: KDLoss,
    cache_dir: Path,
    teacher_fingerprint: str,
    parts: tuple[str, ...] = PARTS,
    internals: InternalsStore | None = None,
    logits_from_cache: bool = False,
) -> Dataset:
    """What a KD stage trains on: the labelled train split (encoded, in prepared order) and the
    unlabelled parts among `parts` that have texts (transfer, augmented), with `has_label` 0 (KD
    terms only). When the terms read only the teacher's logits they come from the cache; terms that
    read the teacher's internals run it live on the same tokens. The pooled hidden-state term (a
    student whose tokens do not line up with the teacher's) gets its targets from the cache too, as a
    `teacher_pooled` column. With `internals` (the teacher's cached per-token states of these parts),
    the terms that read them need no live teacher either: each row gets its `teacher_row` there.
    `logits_from_cache`: the logits come from the cache even though the layer terms run a live model
    (`prune.recovery.distil_from: source_layers`, whose guide's logits are not the teacher's). A
    section without a teacher term (the baseline) gets `train` as is.
    """
    if not kd.needs_teacher:
        return train
    cached = logits_from_cache or not kd.needs_internals or internals is not None
    layers = kd.pooled_teacher_layers

    def add_rows(dataset: Dataset, part: str) -> Dataset:
        if internals is None or not kd.needs_internals:
            return dataset
        first = internals.first_row[part]
        return dataset.add_column("teacher_row", list(range(first, first + len(dataset))))

    def add_cached(dataset: Dataset, split: str, split_texts: list[str]) -> Dataset:
        logits = load(cache_dir, split, split_texts, max_length, teacher_fingerprint)
        dataset = dataset.add_column("teacher_logits", logits.tolist())
        if layers:
            pooled = load_pooled(cache_dir, split, split_texts, max_length, teacher_fingerprint, layers)
            # One flat float32 row per text (Arrow takes 1-D arrays fast; nested lists took seconds).
            dataset = dataset.add_column("teacher_pooled", list(pooled.reshape(len(pooled), -1)))
        return dataset

    if cached:
        train = add_rows(add_cached(train, "train", texts.train), "train")
    unlabelled = {part: read for part, read in texts.read_by(tokenizer, parts).items() if part != "train"}
    if not unlabelled:  # no has_label column: the loss is computed exactly as without unlabelled texts
        return train
    first = train[0]["labels"]
    placeholder = 0 if isinstance(first, int) else [0] * len(first)
    extras = []
    for part, read in unlabelled.items():
        extra = encoding.encode_texts(read, tokenizer, max_length)
        extra = extra.add_column("labels", [placeholder] * len(extra))
        if cached:  # the cache is keyed by the texts as stored (a part's mask placeholder included)
            extra = add_rows(add_cached(extra, part, getattr(texts, part)), part)
        extras.append(extra.add_column("has_label", [0] * len(extra)))
    train = train.add_column("has_label", [1] * len(train))
    return concatenate_datasets([train] + [extra.select_columns(train.column_names).cast(train.features) for extra in extras])
