"""Data sources and their readers: the Financial PhraseBank file, CSV, JSONL, a Hugging Face dataset and
the bundled demo set, each read into `RawRecord`s that remember where they came from, so every error
can name the file and line."""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.config.data import DataConfig, TaskConfig
from pipeline.errors import DataError
from pipeline.io import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawRecord:
    text: Any
    label: Any  # a name or an id; for multi-label a list of names / a delimited string
    where: str  # "file:line" for error messages


# --------------------------------------------------------------------------- readers


# A file is refused as "not text" when more than this share of its characters are control, unassigned
# or replacement characters (random bytes read as Latin-1: about 22%; real text: none, or a stray one,
# which the Latin-1 warning below reports) ...
MAX_UNPRINTABLE_SHARE = 0.05
# ... or when more than this share of its non-blank lines hold no letter at all (of any script).
MAX_LETTERLESS_LINES_SHARE = 0.5
_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_file(path: Path) -> str:
    """UTF-8 first (with or without BOM; UTF-16 and UTF-32 with a BOM), then Windows-1252 (what Excel
    writes), then Latin-1 (Financial PhraseBank mixes UTF-8 and Latin-1; the two agree on every byte it
    uses). A file whose content is mostly not text (binary, compressed, random bytes) is refused."""
    raw = path.read_bytes()
    text = _decode(path, raw)
    problem = not_text_problem(text)
    if problem:
        raise DataError(
            f"{path} is not a text file: {problem}. Is it binary, compressed or in an encoding other than "
            "UTF-8? Point the path (data.path or transfer.path) at a text, CSV or JSONL file saved as UTF-8"
        )
    return text


def _decode(path: Path, raw: bytes) -> str:
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError:
                break  # not really that encoding: the checks below judge the bytes
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


def _unprintable(char: str) -> bool:
    # Whitespace controls (tab, form feed, U+0085 ...) are layout, not garbage.
    return not char.isspace() and (unicodedata.category(char) in ("Cc", "Cn", "Co", "Cs") or char == "\ufffd")


def not_text_problem(text: str) -> str | None:
    """Why `text` (a file's content, or its texts joined by line breaks) is mostly not text, or None.
    Text in any language passes: letters of every script count."""
    if not text.strip():
        return None  # empty: the readers say so in their own words
    unprintable = [char for char in text if _unprintable(char)]
    if len(unprintable) > MAX_UNPRINTABLE_SHARE * len(text):
        shown = ", ".join(sorted({f"U+{ord(c):04X}" for c in unprintable})[:5])
        return (f"{len(unprintable) / len(text):.0%} of its characters are control or unprintable characters "
                f"({shown}, ...; text has almost none)")
    lines = [line for line in text_lines(text) if line.strip()]
    letterless = [line for line in lines if not any(char.isalpha() for char in line)]
    if len(letterless) > MAX_LETTERLESS_LINES_SHARE * len(lines):
        return (f"{len(letterless)} of its {len(lines)} non-blank lines have no letter at all "
                f"(e.g. {letterless[0][:60]!r})")
    return None


def check_texts(texts: list[Any], where: Path) -> None:
    """The same check on texts read from a file's fields (JSON escapes such as \\u0000 decode to controls)."""
    problem = not_text_problem("\n".join(str(text) for text in texts if text is not None))
    if problem:
        raise DataError(
            f"{where}: its texts are not text: {problem}. Check the text column, or point the path at "
            "real sentences"
        )


def text_lines(text: str) -> list[str]:
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
    for number, line in enumerate(text_lines(decode_file(path)), start=1):
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
    rows = csv.DictReader(io.StringIO(decode_file(path), newline=""))
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
    for number, line in enumerate(text_lines(decode_file(path)), start=1):
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
    check_texts([record.text for record in records], path)
    return records, {"type": cfg.source, "path": cfg.path, "sha256": sha256_file(path)}
