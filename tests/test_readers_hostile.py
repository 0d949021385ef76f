"""Valid files read right, ambiguous ones are refused (issue 18, part 2): CSV through the csv module
(quoted line breaks, U+2028), JSONL split on \\n only, Windows-1252 before Latin-1, duplicate headers,
missing-value labels, duplicate keys in params.yaml.

The cases are rows of the bad-input matrix in tests/README.md.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from pipeline.config import DataConfig, TaskConfig, load_params
from pipeline.data.sources import read_csv, read_jsonl, read_phrasebank
from pipeline.data.splitting import to_examples
from pipeline.errors import ConfigError, DataError
from scripts.tiny_project import sh, tiny_params_tree, write_project

CSV = DataConfig(source="csv", path="data.csv")
INFERRED = DataConfig(source="csv", path="data.csv", label_names=None)
SINGLE = TaskConfig()


def examples_of(path, cfg=CSV):
    return to_examples(read_csv(path, cfg, SINGLE), cfg, SINGLE)


def test_a_quoted_line_break_is_kept_as_a_space_not_glued(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"Shares rose\nsharply",positive\n"Flat, again",neutral\n', encoding="utf-8")
    records = read_csv(path, CSV, SINGLE)
    assert [r.text for r in records] == ["Shares rose\nsharply", "Flat, again"]
    assert [e.text for e in examples_of(path)] == ["Shares rose sharply", "Flat, again"]
    assert records[0].where.endswith(":3")  # the line the row ends on


def test_line_separator_characters_inside_a_text_are_kept(tmp_path):
    text = "Revenue\u2028up\x85again\x0cnow"
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(f"text,label\n{text},positive\nOther,negative\n", encoding="utf-8")
    assert [r.text for r in read_csv(csv_path, CSV, SINGLE)] == [text, "Other"]
    jsonl_path = tmp_path / "data.jsonl"
    jsonl_path.write_text(
        json.dumps({"text": text, "label": "positive"}, ensure_ascii=False) + "\r\n"
        + json.dumps({"text": "Other", "label": "negative"}) + "\n\n",
        encoding="utf-8",
    )
    assert [r.text for r in read_jsonl(jsonl_path, CSV, SINGLE)] == [text, "Other"]
    phrasebank = tmp_path / "pb.txt"
    phrasebank.write_text(f"{text}@positive\nOther@negative\n", encoding="utf-8")
    assert [r.text for r in read_phrasebank(phrasebank)] == [text, "Other"]


def test_a_windows_1252_csv_reads_its_punctuation(tmp_path, caplog):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\n\u201cProfit\u201d doubled\u2026 again,positive\n".encode("cp1252"))
    with caplog.at_level(logging.INFO):
        records = read_csv(path, CSV, SINGLE)
    assert [r.text for r in records] == ["\u201cProfit\u201d doubled\u2026 again"]
    assert "reading it as Windows-1252" in caplog.text


def test_latin_1_with_control_characters_warns(tmp_path, caplog):
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\nCaf\xe9 \x81odd,positive\n")  # 0x81 is undefined in Windows-1252
    with caplog.at_level(logging.WARNING):
        records = read_csv(path, CSV, SINGLE)
    assert records[0].text == "Caf\xe9 \x81odd"
    assert "read as Latin-1, but it has C1 control characters ['U+0081']" in caplog.text


def test_duplicate_column_names_are_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label,label\nUp,positive,negative\n")
    with pytest.raises(DataError, match=r"the header names the column\(s\) \['label'\] more than once; rename"):
        read_csv(path, CSV, SINGLE)


@pytest.mark.parametrize("missing", ["NaN", "NA", "None", "null", "n/a"])
def test_an_inferred_label_that_means_missing_is_refused(tmp_path, missing):
    path = tmp_path / "data.csv"
    path.write_text(f"text,label\nUp,positive\nDown,{missing}\n")
    with pytest.raises(DataError, match=rf"data\.csv:3: label '{missing}' is a missing value, not a class"):
        examples_of(path, INFERRED)


def test_missing_value_spellings_are_fine_as_listed_class_names(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nUp,none\nDown,some\n")
    cfg = DataConfig(source="csv", path="data.csv", label_names=["none", "some"])
    assert [e.label for e in examples_of(path, cfg)] == ["none", "some"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:\n  seed: 1\nteacher:\n  epochs: 1\ndata:\n  seed: 2\n",
         r"line 5: key 'data' is given twice \(first on line 1\); the second would silently replace"),
        ("teacher:\n  epochs: 1\n  epochs: 2\n", r"line 3: key 'epochs' is given twice \(first on line 2\)"),
    ],
    ids=["top-level section", "key in a section"],
)
def test_params_with_a_duplicated_key_are_refused(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_params(path)


@pytest.mark.parametrize("value", ["[a", "a: b: c", "{x"])
def test_a_malformed_override_value_is_a_message(tmp_path, value):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"override 'teacher\.model=.*': the value is not valid YAML .*quote it"):
        load_params(path, [f"teacher.model={value}"])


def test_a_malformed_override_on_the_command_line_is_a_message(tmp_path, tiny_bert):
    root = write_project(tmp_path / "project", tiny_params_tree(tiny_bert))
    result = sh([sys.executable, "-m", "stages.prepare_data", "data.label_names=[a, b"], root, check=False)
    assert result.returncode == 1
    assert "error: prepare_data: override 'data.label_names=[a, b': the value is not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr
