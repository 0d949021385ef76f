"""The optional transfer set: unlabelled in-domain texts for the KD students, read in any of the
supported formats and de-duplicated against every split so nothing leaks into validation or test."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.config.data import DataConfig, TaskConfig, TransferConfig, transfer_path
from pipeline.data.normalize import LeakGuard, clean, drop_leaks, log_leak_examples, normalize
from pipeline.data.prepared import HELD_OUT
from pipeline.data.sources import (
    RawRecord,
    check_texts,
    decode_file,
    read_csv,
    read_jsonl,
    read_phrasebank,
    text_lines,
)
from pipeline.data.splitting import Example
from pipeline.errors import DataError

log = logging.getLogger(__name__)


# A Financial PhraseBank line: `sentence@label`.
PHRASEBANK_LINE = re.compile(r"@(negative|neutral|positive)\s*$", re.IGNORECASE)


def transfer_format(path: Path, cfg: TransferConfig) -> str:
    """transfer.format, or for `auto` the file's kind: by extension, then by the shape of its lines."""
    if cfg.format != "auto":
        return cfg.format
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    lines = [line for line in text_lines(decode_file(path)) if line.strip()]
    if lines and all(PHRASEBANK_LINE.search(line) for line in lines):
        return "phrasebank"  # else its labels would end up inside the texts
    return "text"


def read_transfer(path: Path, cfg: TransferConfig) -> tuple[list[RawRecord], str]:
    """The transfer file's records (their labels, if any, are ignored) and the format it was read as."""
    if not path.is_file():
        raise DataError(
            f"transfer.path: {path} is not a file; point transfer.path at a text, CSV, JSONL or Financial "
            "PhraseBank file of unlabelled texts, or set transfer.path: null"
        )
    kind = transfer_format(path, cfg)
    records, kind = _read_transfer(path, cfg, kind)
    check_texts([record.text for record in records], path)
    return records, kind


def _read_transfer(path: Path, cfg: TransferConfig, kind: str) -> tuple[list[RawRecord], str]:
    if kind == "phrasebank":
        return read_phrasebank(path), kind
    if kind == "text":
        lines = enumerate(text_lines(decode_file(path)), start=1)
        return [RawRecord(line, None, f"{path}:{number}") for number, line in lines if line.strip()], kind
    # The labelled readers want a label column; a transfer set has none, so the text column stands in
    # for it (the value is ignored).
    text_only = DataConfig(
        source=kind, path=str(path), text_column=cfg.text_column, label_column=cfg.text_column, label_names=None
    )
    reader = read_csv if kind == "csv" else read_jsonl
    try:
        return reader(path, text_only, TaskConfig()), kind
    except DataError as error:
        raise DataError(f"transfer.path: {str(error).replace('data.text_column', 'transfer.text_column')}") from None


def prepare_transfer(params: Params, splits: dict[str, list[Example]]) -> tuple[list[str], dict[str, Any]]:
    """The transfer texts, cleaned like the splits, without duplicates, without any text of a split in any
    spelling and without near-duplicates of validation or test texts (pipeline/data/normalize.py: nothing
    of validation or test may reach training); and their counts and examples for the manifest."""
    cfg = params.transfer
    path = params.path(transfer_path(cfg, params.data))
    records, kind = read_transfer(path, cfg)
    train_keys = {normalize(example.text) for example in splits["train"]}
    candidates: list[str] = []
    empty = of_train = 0
    for record in records:
        text = clean(record.text)
        if not text:
            empty += 1
        elif normalize(text) in train_keys:  # adds nothing the labelled split does not have
            of_train += 1
        else:
            candidates.append(text)
    guard = LeakGuard({split: [example.text for example in splits[split]] for split in HELD_OUT})
    allowed, leaks = drop_leaks(candidates, guard)
    seen: set[str] = set()
    kept: list[str] = []
    for text in allowed:
        key = normalize(text)
        if key not in seen:
            seen.add(key)
            kept.append(text)
    duplicates = len(allowed) - len(kept)
    beyond = max(0, len(kept) - cfg.max_texts) if cfg.max_texts is not None else 0
    kept = kept[: len(kept) - beyond]
    by_split = {"train": of_train, **{split: leaks["by_split"]["exact"].get(split, 0) for split in HELD_OUT}}
    if not kept:
        raise DataError(
            f"transfer.path: no text of {path} is left ({len(records)} read, {sum(by_split.values())} equal to a "
            f"text of the splits in some spelling, {leaks['near_duplicates_dropped']} near-duplicates of validation "
            f"or test texts, {duplicates} duplicates, {empty} empty); give other texts or set transfer.path: null"
        )
    info = {
        "path": cfg.path,
        "format": kind,
        "rows_read": len(records),
        "empty_dropped": empty,
        "duplicates_dropped": duplicates,
        "split_duplicates_dropped": sum(by_split.values()),
        "split_duplicates_by_split": by_split,
        "near_duplicates_dropped": leaks["near_duplicates_dropped"],
        "near_duplicates_by_split": leaks["by_split"]["near"],
        "similar_kept": leaks["similar_kept"],
        "leak_examples": leaks["examples"],
        "near_duplicate_similarity": leaks["near_duplicate_similarity"],
        "beyond_max_texts_dropped": beyond,
        "kept": len(kept),
    }
    log.info(
        "transfer set: %d texts kept of %d read; dropped %d equal to a text of the splits in some spelling %s, "
        "%d near-duplicates of validation/test texts (similarity >= %.2f) %s, %d duplicates; %d similar texts kept",
        len(kept), len(records), info["split_duplicates_dropped"], by_split, leaks["near_duplicates_dropped"],
        leaks["near_duplicate_similarity"], leaks["by_split"]["near"], duplicates, leaks["similar_kept"],
    )
    log_leak_examples("transfer", leaks)
    return kept, info
