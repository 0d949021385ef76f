"""The prepared splits on disk: `data/prepared/{train,validation,test}.jsonl` and `manifest.json`,
plus `transfer.jsonl` (unlabelled texts, only when `transfer.path` is set).

Every stage after prepare_data reads its data through this module only, so a change to a source
reader in pipeline/data/sources.py re-runs prepare_data, and the rest of the family re-runs only when the prepared
splits themselves change (DVC tracks their content).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import labels as label_utils
from pipeline.errors import DataError
from pipeline.io import read_json, sha256_file, write_json, write_text_atomic

SPLITS = ("train", "validation", "test")
HELD_OUT = ("validation", "test")  # never trained on, in any spelling
MANIFEST_FILE = "manifest.json"
# A manifest key listing splits a view of the data withholds (a search's view withholds "test").
WITHHELD_KEY = "withheld_splits"
TRANSFER_FILE = "transfer.jsonl"  # unlabelled texts for distillation (text only)


# --------------------------------------------------------------------------- writing


def split_jsonl(rows: list[tuple[str, str | tuple[str, ...]]]) -> str:
    """(text, label) pairs as JSON lines; a multi-label label is a list of names."""
    lines = []
    for text, label in rows:
        label = list(label) if isinstance(label, tuple) else label
        lines.append(json.dumps({"text": text, "label": label}, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def write_prepared(
    out_dir: Path,
    splits: dict[str, list[tuple[str, str | tuple[str, ...]]]],
    label_names: list[str],
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write the three splits and the manifest (with per-split counts and content hashes) into `out_dir`."""
    manifest = {**manifest, "label_names": label_names, "splits": {}}
    for name in SPLITS:
        path = out_dir / f"{name}.jsonl"
        write_text_atomic(path, split_jsonl(splits[name]))
        manifest["splits"][name] = {
            "rows": len(splits[name]),
            "class_counts": _class_counts(splits[name], label_names),
            "sha256": sha256_file(path),
        }
    manifest["content_hash"] = hashlib.sha256(
        "".join(manifest["splits"][name]["sha256"] for name in SPLITS).encode()
    ).hexdigest()
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def write_transfer(out_dir: Path, texts: list[str]) -> str:
    """Write the transfer texts (one {"text": ...} per line); return the file's sha256."""
    path = out_dir / TRANSFER_FILE
    write_text_atomic(path, "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts))
    return sha256_file(path)


def _class_counts(rows: list[tuple[str, Any]], names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for _, label in rows:
        for name in label if isinstance(label, tuple) else [label]:
            if name in counts:
                counts[name] += 1
    return counts


# --------------------------------------------------------------------------- reading


def load_manifest(prepared_dir: Path) -> dict[str, Any]:
    path = prepared_dir / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare_data stage first (dvc repro prepare_data)")
    return read_json(path)


def load_split(prepared_dir: Path, split: str) -> list[dict[str, Any]]:
    path = prepared_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare_data stage first (dvc repro prepare_data)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not rows:
        raise DataError(f"{path} is empty: there is nothing to train or evaluate on; re-run prepare_data")
    return rows


@dataclass
class Prepared:
    """The prepared data of one project: the manifest and, read on first use, each split."""

    directory: Path
    manifest: dict[str, Any]
    _rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _labels: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest["label_names"])

    @property
    def task_type(self) -> str:
        return self.manifest.get("task_type", "single_label")

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def withheld(self) -> tuple[str, ...]:
        """Splits this view of the data must never read (none for the prepared data itself)."""
        return tuple(self.manifest.get(WITHHELD_KEY, ()))

    @property
    def evaluated_splits(self) -> tuple[str, ...]:
        """The splits every model is evaluated on: validation and test, or validation alone in a view
        that withholds test (a search)."""
        return tuple(split for split in ("validation", "test") if split not in self.withheld)

    @property
    def judged_split(self) -> str:
        """The split the export parity gates are judged on: test, or validation when test is withheld."""
        return self.evaluated_splits[-1]

    def rows(self, split: str) -> list[dict[str, Any]]:
        if split in self.withheld:
            raise DataError(
                f"the {split} split is withheld from {self.directory} (a search view: model choices must "
                f"never see it); read it only from the prepared data itself, after the search"
            )
        if split not in self._rows:
            self._rows[split] = load_split(self.directory, split)
        return self._rows[split]

    def texts(self, split: str) -> list[str]:
        return [row["text"] for row in self.rows(split)]

    def transfer_texts(self) -> list[str]:
        """The unlabelled transfer texts; none when prepare_data ran without `transfer.path`."""
        if "transfer" not in self.manifest:
            return []
        path = self.directory / TRANSFER_FILE
        if not path.is_file() or sha256_file(path) != self.manifest["transfer"]["sha256"]:
            raise DataError(f"{path} is missing or differs from {MANIFEST_FILE}; re-run prepare_data")
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]

    def labels(self, split: str) -> np.ndarray:
        """Encoded labels: class ids (single-label) or multi-hot rows (multi-label). Encoded once per
        split (every evaluation asks again) and read-only, like the prepared data they come from."""
        if split not in self._labels:
            labels = np.asarray([label_utils.encode(row["label"], self.label_names, self.task_type) for row in self.rows(split)])
            labels.setflags(write=False)
            self._labels[split] = labels
        return self._labels[split]


def load_prepared(prepared_dir: Path) -> Prepared:
    """The manifest now; each split when it is first asked for."""
    return Prepared(prepared_dir, load_manifest(prepared_dir))


def write_view(prepared_dir: Path, out_dir: Path, withheld: tuple[str, ...] = ("test",)) -> Prepared:
    """A copy of the prepared data in `out_dir` without the `withheld` splits: their files are absent and
    reading them through `Prepared` is an error. Train, validation and transfer texts are copied as is,
    so their hashes (and the teacher logits cached for them) still match."""
    import shutil

    source = load_prepared(prepared_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in [f"{split}.jsonl" for split in SPLITS if split not in withheld] + [TRANSFER_FILE]:
        if (prepared_dir / name).is_file():
            shutil.copyfile(prepared_dir / name, out_dir / name)
    write_json(out_dir / MANIFEST_FILE, {**source.manifest, WITHHELD_KEY: list(withheld)})
    return load_prepared(out_dir)
