"""Readers, checks and the split: every source and every bad-input case."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import pytest

from pipeline.config import params_from_dict
from pipeline.data import labels as label_utils
from pipeline.data.prepare import prepare
from pipeline.data.prepared import load_prepared, load_split
from pipeline.errors import DataError
from pipeline.io import OUTPUT_MARKER
from scripts.tiny_project import REPO, TINY_CSV
from stages import prepare_data
from tests.helpers import PHRASEBANK


def rows_from_tiny():
    with open(TINY_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


def params_for(tmp_path, **data):
    tree = {"data": {"validation_fraction": 0.2, "test_fraction": 0.2, "seed": 0, **data}}
    return params_from_dict(tree, root=tmp_path)


def prepared(tmp_path, **data):
    out = tmp_path / "prepared"
    out.mkdir(exist_ok=True)
    manifest = prepare(params_for(tmp_path, **data), out)
    splits = {name: load_split(out, name) for name in ("train", "validation", "test")}
    return manifest, splits


def write_phrasebank(path, rows, encoding="utf-8"):
    path.write_bytes("".join(f"{r['text']}@{r['label']}\n" for r in rows).encode(encoding))


def test_phrasebank_reader_handles_both_encodings(tmp_path):
    rows = rows_from_tiny()
    rows[0] = {**rows[0], "text": "Net sales of Oy Äänekoski rose to EUR 5 mn ."}
    write_phrasebank(tmp_path / "utf8.txt", rows, "utf-8")
    write_phrasebank(tmp_path / "latin1.txt", rows, "latin-1")
    for name in ("utf8.txt", "latin1.txt"):
        manifest, splits = prepared(tmp_path, source="phrasebank", path=name)
        texts = [r["text"] for split in splits.values() for r in split]
        assert "Net sales of Oy Äänekoski rose to EUR 5 mn ." in texts
        assert manifest["rows_read"] == len(rows)


def test_phrasebank_sentence_may_contain_at_sign(tmp_path):
    rows = rows_from_tiny()
    rows[0] = {**rows[0], "text": "Contact ir@company.fi for the report"}
    write_phrasebank(tmp_path / "pb.txt", rows)
    _, splits = prepared(tmp_path, source="phrasebank", path="pb.txt")
    assert any(r["text"] == "Contact ir@company.fi for the report" for s in splits.values() for r in s)


def test_malformed_phrasebank_line_names_file_and_line(tmp_path):
    rows = rows_from_tiny()
    path = tmp_path / "pb.txt"
    write_phrasebank(path, rows)
    lines = path.read_text().splitlines()
    lines.insert(6, "a line without any separator")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"pb\.txt:7: malformed line"):
        prepared(tmp_path, source="phrasebank", path="pb.txt")


def test_csv_with_integer_labels_and_label_map(tmp_path):
    names = ["negative", "neutral", "positive"]
    with open(tmp_path / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "sentiment"])
        for row in rows_from_tiny():
            raw = names.index(row["label"])
            writer.writerow([row["text"], "bullish" if raw == 2 else raw])
    manifest, splits = prepared(
        tmp_path, source="csv", path="data.csv", text_column="sentence", label_column="sentiment",
        label_map={"bullish": "positive"},
    )
    counts = Counter(r["label"] for s in splits.values() for r in s)
    expected = Counter(r["label"] for r in rows_from_tiny())
    assert counts == expected
    assert manifest["label_names"] == names


def test_jsonl_reader(tmp_path):
    with open(tmp_path / "data.jsonl", "w") as handle:
        for row in rows_from_tiny():
            handle.write(json.dumps({"body": row["text"], "y": row["label"]}) + "\n")
    manifest, _ = prepared(tmp_path, source="jsonl", path="data.jsonl", text_column="body", label_column="y")
    assert sum(s["rows"] for s in manifest["splits"].values()) == len(rows_from_tiny())


def test_hub_reader_on_a_local_dataset_with_class_labels(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    rows = rows_from_tiny()
    names = ["negative", "neutral", "positive"]
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=names)})
    folder = tmp_path / "local_dataset"
    folder.mkdir()
    dataset = Dataset.from_dict(
        {"sentence": [r["text"] for r in rows], "label": [names.index(r["label"]) for r in rows]}, features=features
    )
    dataset.to_parquet(str(folder / "train.parquet"))
    manifest, splits = prepared(tmp_path, source="hub", hub_dataset=str(folder), text_column="sentence")
    assert Counter(r["label"] for s in splits.values() for r in s) == Counter(r["label"] for r in rows)
    assert manifest["source"]["type"] == "hub"


def test_hub_reader_unreachable_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not load Hugging Face dataset"):
        prepared(tmp_path, source="hub", hub_dataset="no-such-org/no-such-dataset-fincompress")


def test_whitespace_normalised_and_duplicates_dropped(tmp_path):
    rows = rows_from_tiny()
    extra = [
        {"text": "  Operating profit rose   sharply in the third quarter. ", "label": "positive"},
        {"text": "The plant is located near the harbour.", "label": "positive"},  # conflicts
    ]
    with open(tmp_path / "data.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows + extra)
    manifest, splits = prepared(tmp_path, source="csv", path="data.csv")
    assert manifest["exact_duplicates_dropped"] == 1
    assert manifest["conflicting_rows_dropped"] == 2
    texts = [r["text"] for s in splits.values() for r in s]
    assert "The plant is located near the harbour." not in texts
    assert len(texts) == len(set(texts)) == len(rows) - 1


def test_split_is_deterministic_stratified_and_disjoint(tmp_path):
    shutil.copy(TINY_CSV, tmp_path / "tiny.csv")
    first_manifest, first = prepared(tmp_path, source="csv", path="tiny.csv")
    second_manifest, second = prepared(tmp_path, source="csv", path="tiny.csv")
    assert first == second and first_manifest["content_hash"] == second_manifest["content_hash"]
    sets = {name: {r["text"] for r in rows} for name, rows in first.items()}
    assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"] or sets["validation"] & sets["test"])
    for name in ("validation", "test"):
        assert set(first_manifest["splits"][name]["class_counts"].values()) != {0}
        assert all(count > 0 for count in first_manifest["splits"][name]["class_counts"].values())
    _, other_seed = prepared(tmp_path, source="csv", path="tiny.csv", seed=1)
    assert other_seed != first


def test_prepared_labels_are_encoded_once_per_split_and_read_only(tmp_path, monkeypatch):
    shutil.copy(TINY_CSV, tmp_path / "tiny.csv")
    prepared(tmp_path, source="csv", path="tiny.csv")
    data = load_prepared(tmp_path / "prepared")
    calls = []
    original = label_utils.encode
    monkeypatch.setattr(label_utils, "encode", lambda *args: calls.append(args) or original(*args))
    first = data.labels("validation")
    assert len(calls) == len(data.texts("validation"))
    assert data.labels("validation") is first and len(calls) == len(first), "the second call re-encodes nothing"
    assert [data.label_names[i] for i in first] == [row["label"] for row in data.rows("validation")]
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 0  # shared by every caller: nobody may change it


def write_csv(path, rows, fieldnames=("text", "label")):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)


BAD_INPUTS = {
    "missing file": (lambda p: None, {"path": "absent.csv"}, "file not found"),
    "unknown label": (
        lambda p: write_csv(p, rows_from_tiny() + [{"text": "Shares were flat.", "label": "sideways"}]),
        {}, "unknown label 'sideways'",
    ),
    "empty input": (lambda p: write_csv(p, []), {}, "no examples"),
    "single class": (
        lambda p: write_csv(p, [r for r in rows_from_tiny() if r["label"] == "neutral"]),
        {"label_names": None}, "single class",
    ),
    "class too small": (
        lambda p: write_csv(p, [r for r in rows_from_tiny() if r["label"] != "negative"][:40]
                            + [r for r in rows_from_tiny() if r["label"] == "negative"][:2]),
        {}, "too small to stratify",
    ),
    "text column missing": (
        lambda p: write_csv(p, [{"sentence": r["text"], "label": r["label"]} for r in rows_from_tiny()],
                            ("sentence", "label")),
        {}, "column 'text' not found",
    ),
    "empty text": (
        lambda p: write_csv(p, rows_from_tiny() + [{"text": "   ", "label": "neutral"}]), {}, "empty text",
    ),
    "ragged row": (
        lambda p: p.write_text("text,label\nOne,neutral,extra\n"), {}, "more fields than the header",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_leaves_outputs_untouched(tmp_path, case):
    make, data, message = BAD_INPUTS[case]
    make(tmp_path / "data.csv")
    tree = {"data": {"source": "csv", "path": "data.csv", **data}}
    params = params_from_dict(tree, root=tmp_path)
    previous = tmp_path / "data" / "prepared"
    previous.mkdir(parents=True)
    (previous / "manifest.json").write_text("previous run")
    (previous / OUTPUT_MARKER).write_text("a previous run of this pipeline")
    with pytest.raises(DataError, match=message):
        prepare_data.STAGE.execute(params)
    assert sorted(p.name for p in previous.iterdir()) == [OUTPUT_MARKER, "manifest.json"]
    assert (previous / "manifest.json").read_text() == "previous run"
    assert not (tmp_path / "reports" / "metrics" / "prepare_data.json").exists()
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_bundled_demo_set():
    """600-900 authored sentences, neutral the largest class, no duplicates."""
    with open(REPO / "data" / "demo" / "financial_news_sentiment.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert 600 <= len(rows) <= 900
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {"negative", "neutral", "positive"}
    assert counts.most_common(1)[0][0] == "neutral"
    assert len({r["text"] for r in rows}) == len(rows)


@pytest.mark.phrasebank
@pytest.mark.skipif(not (PHRASEBANK / "Sentences_AllAgree.txt").exists(), reason="Financial PhraseBank absent")
def test_real_phrasebank_files(tmp_path):
    manifest, _ = prepared(tmp_path, source="phrasebank", path=str(PHRASEBANK / "Sentences_AllAgree.txt"))
    assert manifest["rows_read"] == 2264 and manifest["exact_duplicates_dropped"] == 5
    manifest, _ = prepared(tmp_path, source="phrasebank", path=str(PHRASEBANK / "Sentences_50Agree.txt"))
    assert manifest["rows_read"] == 4846  # Latin-1: decoded without errors
