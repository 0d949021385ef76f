"""Data sources, checks and the stratified split.

Readers turn a source (Financial PhraseBank file, CSV, JSONL, a Hugging Face dataset, the bundled
demo set) into `RawRecord`s that remember where they came from, so every error can name the file and
line. `prepare()` normalises, de-duplicates, validates and splits them; the prepared splits are
JSONL files with a manifest that records counts and content hashes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.config.data import DataConfig, TaskConfig, TransferConfig
from pipeline.data.prepared import SPLITS, write_prepared, write_transfer
from pipeline.errors import DataError
from pipeline.io import sha256_file

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RawRecord:
    text: Any
    label: Any  # a name or an id; for multi-label a list of names / a delimited string
    where: str  # "file:line" for error messages


@dataclass(frozen=True)
class Example:
    text: str
    label: str | tuple[str, ...]  # a class name; for multi-label a sorted tuple of label names


# --------------------------------------------------------------------------- readers


def _decode(path: Path) -> str:
    """UTF-8 first (with or without BOM), then Windows-1252 (what Excel writes), then Latin-1
    (Financial PhraseBank mixes UTF-8 and Latin-1; the two agree on every byte it uses)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
        log.info("%s is not UTF-8; reading it as Windows-1252", path)
        return text
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    controls = sorted({f"U+{ord(c):04X}" for c in text if "\x80" <= c <= "\x9f"})
    log.warning(
        "%s is neither UTF-8 nor Windows-1252; read as Latin-1, but it has C1 control characters %s that "
        "are probably mis-decoded punctuation. Save the file as UTF-8 to be sure", path, controls[:10],
    )
    return text


def _lines(text: str) -> list[str]:
    """Lines split on \\n only (str.splitlines would also split inside a text at U+2028, U+0085, ...)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(
            f"data.path: file not found: {path}; point data.path at your {what} file, "
            "or set data.source=demo to use the bundled demo set"
        )
    if not path.is_file():
        raise DataError(f"data.path: {path} is a directory, expected a {what} file")


def read_phrasebank(path: Path) -> list[RawRecord]:
    """Financial PhraseBank: one `sentence@label` per line (any of the four agreement files)."""
    _require_file(path, "Financial PhraseBank (sentence@label)")
    records = []
    for number, line in enumerate(_lines(_decode(path)), start=1):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("@")
        if not sep or not text.strip() or not label.strip():
            raise DataError(
                f"{path}:{number}: malformed line, expected 'sentence@label': {line[:80]!r}"
            )
        records.append(RawRecord(text, label.strip().lower(), f"{path}:{number}"))
    return records


def _multi_label_columns(cfg: DataConfig, task: TaskConfig) -> list[str] | None:
    return cfg.label_columns if task.type == "multi_label" and cfg.label_columns else None


def read_csv(path: Path, cfg: DataConfig, task: TaskConfig) -> list[RawRecord]:
    _require_file(path, "CSV")
    # The csv module over the whole text: a quoted field keeps its line breaks (Excel's Alt+Enter).
    rows = csv.DictReader(io.StringIO(_decode(path), newline=""))
    columns = rows.fieldnames or []
    duplicated = sorted({column for column in columns if columns.count(column) > 1})
    if duplicated:
        raise DataError(
            f"{path}: the header names the column(s) {duplicated} more than once; rename them so every "
            "column has its own name"
        )
    label_columns = _multi_label_columns(cfg, task)
    needed = [cfg.text_column] + (label_columns or [cfg.label_column])
    for column in needed:
        if column not in columns:
            key = "data.text_column" if column == cfg.text_column else "data.label_column(s)"
            raise DataError(
                f"{path}: column {column!r} not found; the header has {columns}. Set {key} to the right column."
            )
    records = []
    for row in rows:
        where = f"{path}:{rows.line_num}"
        if None in row:
            raise DataError(f"{where}: malformed row, more fields than the header has (check quoting)")
        if any(row[column] is None for column in needed):
            raise DataError(f"{where}: malformed row, fewer fields than the header has")
        label = _label_from_columns(row, label_columns, where) if label_columns else row[cfg.label_column]
        records.append(RawRecord(row[cfg.text_column], label, where))
    return records


def read_jsonl(path: Path, cfg: DataConfig, task: TaskConfig) -> list[RawRecord]:
    _require_file(path, "JSONL")
    label_columns = _multi_label_columns(cfg, task)
    records = []
    for number, line in enumerate(_lines(_decode(path)), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: malformed line, not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: malformed line, expected a JSON object per line")
        for column in [cfg.text_column] + (label_columns or [cfg.label_column]):
            if column not in row:
                raise DataError(f"{where}: key {column!r} missing; the object has {sorted(row)}")
        label = _label_from_columns(row, label_columns, where) if label_columns else row[cfg.label_column]
        records.append(RawRecord(row[cfg.text_column], label, where))
    return records


def _label_from_columns(row: dict[str, Any], columns: list[str], where: str) -> list[str]:
    """Multi-label data with one 0/1 column per label."""
    labels = []
    for column in columns:
        value = str(row[column]).strip().lower()
        if value in ("1", "1.0", "true", "yes"):
            labels.append(column)
        elif value not in ("0", "0.0", "false", "no", ""):
            raise DataError(f"{where}: column {column!r} must be 0 or 1, got {row[column]!r}")
    return labels


def read_hub(cfg: DataConfig, task: TaskConfig) -> list[RawRecord]:
    """A Hugging Face dataset (hub id or local folder) through `datasets.load_dataset`."""
    import datasets

    source = cfg.hub_dataset
    try:
        loaded = datasets.load_dataset(source, name=cfg.hub_config, split=cfg.hub_split)
    except Exception as error:  # datasets raises many types; all mean "could not load"
        raise DataError(
            f"data.path: could not load Hugging Face dataset {source!r} "
            f"(config {cfg.hub_config!r}, split {cfg.hub_split!r}): {type(error).__name__}: {error}. "
            "Check the id and your network (or HF_HUB_OFFLINE), or set data.hub_dataset to a local dataset folder."
        ) from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(cfg.hub_split, loaded)]
    label_columns = _multi_label_columns(cfg, task)
    records = []
    for split_name, part in parts:
        needed = [cfg.text_column] + (label_columns or [cfg.label_column])
        for column in needed:
            if column not in part.column_names:
                raise DataError(
                    f"dataset {source!r} split {split_name!r}: column {column!r} not found; "
                    f"it has {part.column_names}. Set data.text_column / data.label_column."
                )
        feature = part.features.get(cfg.label_column)
        names = getattr(feature, "names", None)  # ClassLabel: ids -> names
        for index, row in enumerate(part):
            where = f"{source}[{split_name}]#{index}"
            if label_columns:
                label = _label_from_columns(row, label_columns, where)
            else:
                label = row[cfg.label_column]
                if names is not None and isinstance(label, int) and 0 <= label < len(names):
                    label = names[label]
            records.append(RawRecord(row[cfg.text_column], label, where))
    return records


def read_source(params: Params) -> tuple[list[RawRecord], dict[str, Any]]:
    """Read the configured source; also return a description of it for the manifest."""
    cfg, task = params.data, params.task
    if cfg.source == "hub":
        return read_hub(cfg, task), {"type": "hub", "dataset": cfg.hub_dataset, "config": cfg.hub_config,
                                     "split": cfg.hub_split}
    path = params.path(cfg.path)
    if cfg.source == "phrasebank":
        records = read_phrasebank(path)
    elif cfg.source in ("csv", "demo"):
        records = read_csv(path, cfg, task)
    else:
        records = read_jsonl(path, cfg, task)
    return records, {"type": cfg.source, "path": cfg.path, "sha256": sha256_file(path)}


# --------------------------------------------------------------------------- labels and checks


def normalize_text(text: Any) -> str:
    """Collapse every run of whitespace to one space and trim."""
    return " ".join(str(text).split()) if text is not None else ""


# Spellings of "no value" that must never become a class when label names are inferred.
MISSING_LABELS = {"", "nan", "na", "n/a", "none", "null"}


def _canonical_label(raw: Any, cfg: DataConfig, where: str) -> str:
    key = str(raw).strip()
    key = cfg.label_map.get(key, key)
    names = cfg.label_names
    if names is None or key in names:
        if not key:
            raise DataError(f"{where}: empty label")
        if names is None and key.lower() in MISSING_LABELS:
            raise DataError(
                f"{where}: label {raw!r} is a missing value, not a class; fill it in or drop the row "
                "(or list the classes in data.label_names)"
            )
        return key
    if key.lstrip("-").isdigit():  # integer labels index label_names
        index = int(key)
        if 0 <= index < len(names):
            return names[index]
    raise DataError(
        f"{where}: unknown label {raw!r}; allowed: {names} (or their ids 0..{len(names) - 1}). "
        "Map other spellings with data.label_map, e.g. {bearish: negative}."
    )


def _multi_labels(raw: Any, cfg: DataConfig, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        stripped = raw.strip()
        if stripped.startswith("["):
            try:
                raw = json.loads(stripped)
            except json.JSONDecodeError:
                raise DataError(f"{where}: label list {raw!r} is not valid JSON") from None
        else:
            raw = [part for part in stripped.split(cfg.label_separator) if part.strip()]
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    return tuple(sorted({_canonical_label(item, cfg, where) for item in raw}))


def to_examples(records: list[RawRecord], cfg: DataConfig, task: TaskConfig) -> list[Example]:
    examples = []
    for record in records:
        text = normalize_text(record.text)
        if not text:
            raise DataError(f"{record.where}: empty text")
        if task.type == "multi_label":
            label: str | tuple[str, ...] = _multi_labels(record.label, cfg, record.where)
        else:
            label = _canonical_label(record.label, cfg, record.where)
        examples.append(Example(text, label))
    return examples


def deduplicate(examples: list[Example]) -> tuple[list[Example], int, int]:
    """Drop exact duplicate texts. Returns (kept, duplicates dropped, conflicting texts dropped).

    A text that appears with different labels is ambiguous; all its copies are dropped.
    """
    by_text: dict[str, set] = {}
    for example in examples:
        by_text.setdefault(example.text, set()).add(example.label)
    conflicting = {text for text, labels in by_text.items() if len(labels) > 1}
    seen: set[str] = set()
    kept = []
    for example in examples:
        if example.text in seen or example.text in conflicting:
            continue
        seen.add(example.text)
        kept.append(example)
    duplicates = len(examples) - len(kept) - sum(1 for e in examples if e.text in conflicting)
    conflict_rows = sum(1 for e in examples if e.text in conflicting)
    return kept, duplicates, conflict_rows


def label_names_for(examples: list[Example], cfg: DataConfig) -> list[str]:
    if cfg.label_names is not None:
        return list(cfg.label_names)
    found: set[str] = set()
    for example in examples:
        found.update(example.label if isinstance(example.label, tuple) else [example.label])
    spellings: dict[str, list[str]] = {}
    for name in sorted(found):
        spellings.setdefault("".join(name.lower().split()), []).append(name)
    for names in spellings.values():
        if len(names) > 1:
            log.warning(
                "labels %s differ only by case or spaces and become separate classes; if they mean the "
                "same, map them together with data.label_map, e.g. {%r: %r}", names, names[1], names[0],
            )
    return sorted(found)


# --------------------------------------------------------------------------- split


def split_examples(
    examples: list[Example], names: list[str], params: Params
) -> dict[str, list[Example]]:
    """Stratified train/validation/test split with a fixed seed."""
    cfg = params.data
    if not examples:
        raise DataError("the input has no examples; check data.source and data.path")
    if params.task.type == "multi_label":
        from pipeline.data.multilabel import iterative_split

        return iterative_split(
            examples, names, cfg.validation_fraction, cfg.test_fraction, cfg.seed,
            params.task.missing_label_in_split,
        )
    counts = Counter(example.label for example in examples)
    if len(counts) < 2:
        (only,) = counts
        raise DataError(
            f"the input has a single class ({only!r}, {counts[only]} examples); "
            "a classifier needs at least two. Check data.label_column."
        )
    missing = [name for name in names if name not in counts]
    if missing:
        raise DataError(
            f"classes {missing} have no examples; remove them from data.label_names or add data for them"
        )
    smallest = min(cfg.validation_fraction, cfg.test_fraction)
    needed = max(3, int(-(-1 // smallest)))  # enough that every split gets at least one
    too_small = {name: count for name, count in counts.items() if count < needed}
    if too_small:
        raise DataError(
            f"classes too small to stratify into train/validation/test: {too_small}; each needs at "
            f"least {needed} examples with validation_fraction={cfg.validation_fraction} and "
            f"test_fraction={cfg.test_fraction}. Add examples, merge the class via data.label_map, "
            "or raise the fractions."
        )
    from sklearn.model_selection import train_test_split

    labels = [example.label for example in examples]
    rest, test = train_test_split(
        examples, test_size=cfg.test_fraction, stratify=labels, random_state=cfg.seed
    )
    validation_share = cfg.validation_fraction / (1 - cfg.test_fraction)
    train, validation = train_test_split(
        rest, test_size=validation_share, stratify=[e.label for e in rest], random_state=cfg.seed
    )
    return {"train": train, "validation": validation, "test": test}


# --------------------------------------------------------------------------- the transfer set

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
    lines = [line for line in _lines(_decode(path)) if line.strip()]
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
    if kind == "phrasebank":
        return read_phrasebank(path), kind
    if kind == "text":
        lines = enumerate(_lines(_decode(path)), start=1)
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
    """The transfer texts, normalised like the splits, without duplicates and without any text of a split
    (nothing of validation or test may reach training); and their counts for the manifest."""
    cfg = params.transfer
    path = params.path(cfg.path)
    records, kind = read_transfer(path, cfg)
    split_of = {example.text: name for name in SPLITS for example in splits[name]}
    leaked = dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()
    kept: list[str] = []
    empty = duplicates = 0
    for record in records:
        text = normalize_text(record.text)
        if not text:
            empty += 1
        elif text in split_of:
            leaked[split_of[text]] += 1
        elif text in seen:
            duplicates += 1
        else:
            seen.add(text)
            kept.append(text)
    beyond = max(0, len(kept) - cfg.max_texts) if cfg.max_texts is not None else 0
    kept = kept[: len(kept) - beyond]
    if not kept:
        raise DataError(
            f"transfer.path: no text of {path} is left ({len(records)} read, {sum(leaked.values())} equal to a "
            f"text of the splits, {duplicates} duplicates, {empty} empty); give other texts or set transfer.path: null"
        )
    info = {
        "path": cfg.path,
        "format": kind,
        "rows_read": len(records),
        "empty_dropped": empty,
        "duplicates_dropped": duplicates,
        "split_duplicates_dropped": sum(leaked.values()),
        "split_duplicates_by_split": leaked,
        "beyond_max_texts_dropped": beyond,
        "kept": len(kept),
    }
    log.info(
        "transfer set: %d texts kept of %d read; dropped %d equal to a text of the splits %s, %d duplicates",
        len(kept), len(records), info["split_duplicates_dropped"], leaked, duplicates,
    )
    return kept, info


# --------------------------------------------------------------------------- the prepared splits


def prepare(params: Params, out_dir: Path) -> dict[str, Any]:
    """Read, check, de-duplicate and split the source; write the splits and manifest into `out_dir`."""
    records, source = read_source(params)
    examples = to_examples(records, params.data, params.task)
    if not examples:
        raise DataError(f"the input has no examples ({source}); check data.path")
    kept, duplicates, conflicts = deduplicate(examples)
    if duplicates or conflicts:
        log.info("dropped %d exact duplicates and %d rows whose text had conflicting labels", duplicates, conflicts)
    names = label_names_for(kept, params.data)
    splits = split_examples(kept, names, params)
    manifest = {
        "task_type": params.task.type,
        "source": source,
        "rows_read": len(records),
        "exact_duplicates_dropped": duplicates,
        "conflicting_rows_dropped": conflicts,
        "seed": params.data.seed,
        "fractions": {"validation": params.data.validation_fraction, "test": params.data.test_fraction},
    }
    if params.transfer.path is not None:  # without a transfer set the outputs are exactly as before
        texts, info = prepare_transfer(params, splits)
        manifest["transfer"] = {**info, "sha256": write_transfer(out_dir, texts)}
    pairs = {name: [(example.text, example.label) for example in splits[name]] for name in SPLITS}
    return write_prepared(out_dir, pairs, names, manifest)
