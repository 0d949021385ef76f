"""From records to the splits: normalised texts and canonical labels (with the checks that name the
bad row), de-duplication, the class names, and the stratified train/validation/test split."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.config import Params
from pipeline.config.data import DataConfig, TaskConfig
from pipeline.data.normalize import LeakGuard, clean, drop_leaks, log_leak_examples, normalize
from pipeline.data.sources import RawRecord
from pipeline.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    text: str
    label: str | tuple[str, ...]  # a class name; for multi-label a sorted tuple of label names


# --------------------------------------------------------------------------- labels and checks


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
        text = clean(record.text)
        if not text:
            raise DataError(f"{record.where}: empty text")
        if task.type == "multi_label":
            label: str | tuple[str, ...] = _multi_labels(record.label, cfg, record.where)
        else:
            label = _canonical_label(record.label, cfg, record.where)
        examples.append(Example(text, label))
    return examples


def deduplicate(examples: list[Example]) -> tuple[list[Example], int, int]:
    """Drop duplicate texts, in any spelling (the same `normalize` key: case, accents, spacing, ...).
    Returns (kept, duplicates dropped, conflicting rows dropped).

    A text that appears with different labels is ambiguous; all its copies are dropped.
    """
    keys = [normalize(example.text) for example in examples]
    labels_of: dict[str, set] = {}
    for key, example in zip(keys, examples):
        labels_of.setdefault(key, set()).add(example.label)
    conflicting = {key for key, labels in labels_of.items() if len(labels) > 1}
    seen: set[str] = set()
    kept = []
    for key, example in zip(keys, examples):
        if key in seen or key in conflicting:
            continue
        seen.add(key)
        kept.append(example)
    conflict_rows = sum(1 for key in keys if key in conflicting)
    return kept, len(examples) - len(kept) - conflict_rows, conflict_rows


def drop_cross_split_near_duplicates(splits: dict[str, list[Example]]) -> dict[str, Any]:
    """Near-duplicates across the splits (the same sentence with a number changed, pipeline/data/normalize.py)
    end up in one split: a validation text near a test text, and a train text near a validation or test
    text, is dropped (the held-out splits keep their stratified shares). Returns the drop_leaks summary
    per split changed; `splits` is filtered in place."""
    texts = {name: [example.text for example in splits[name]] for name in splits}
    summaries: dict[str, Any] = {}
    for split, held_out in (("validation", ("test",)), ("train", ("validation", "test"))):
        kept, summary = drop_leaks(texts[split], LeakGuard({name: texts[name] for name in held_out}))
        keep = set(kept)
        splits[split] = [example for example in splits[split] if example.text in keep]
        if not splits[split]:
            example = (summary["examples"]["near"] or summary["examples"]["exact"])[0]
            raise DataError(
                f"every {split} text is a near-duplicate of a {' or '.join(held_out)} text (e.g. {example['text']!r} "
                f"and {example['matches']!r}: the same sentence with numbers or punctuation changed), so the split "
                "would be empty. Give texts that differ in their words, not only in their numbers"
            )
        texts[split] = kept
        summaries[split] = summary
        log_leak_examples(f"{split} split", summary)
    return summaries


def label_names_for(examples: list[Example], cfg: DataConfig) -> list[str]:
    """The class names: data.label_names, or the sorted labels of the data. Names that differ only by
    case, spacing or accents are refused (they are almost always one class spelled two ways) unless
    data.keep_similar_labels says they are meant."""
    if cfg.label_names is not None:
        names = list(cfg.label_names)
    else:
        found: set[str] = set()
        for example in examples:
            found.update(example.label if isinstance(example.label, tuple) else [example.label])
        names = sorted(found)
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault("".join(normalize(name).split()), []).append(name)
    for similar in (group for group in spellings.values() if len(group) > 1):
        where = "data.label_names lists" if cfg.label_names is not None else "the data has"
        if not cfg.keep_similar_labels:
            raise DataError(
                f"{where} labels {similar} that differ only by case, spacing or accents, so they would be "
                f"separate classes. If they mean the same, map them together with data.label_map, e.g. "
                f"-S 'data.label_map={{{_quoted(similar[0])}: {_quoted(similar[-1])}}}'; if they are different classes, "
                "set data.keep_similar_labels=true"
            )
        log.warning("labels %s differ only by case, spacing or accents and stay separate classes "
                    "(data.keep_similar_labels=true)", similar)
    return names


def _quoted(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)  # YAML reads it back, inside the shell's single quotes


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
