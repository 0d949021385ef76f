"""Garbage is not text, and one class is not two (issue 30 classes 2 and 6).

A data or transfer file whose content is mostly not text (random bytes, a compressed or binary file,
lines without a letter, control characters behind JSON escapes) is refused with an error naming the
file; real text in any script, and UTF-16 with its BOM, is read. Labels that differ only by case,
spacing or accents are refused unless data.label_map maps them together or data.keep_similar_labels
says they are meant. The cases are rows of the bad-input matrix in tests/README.md.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import sys

import pytest

from pipeline.config import DataConfig, TaskConfig
from pipeline.data.sources import read_csv, read_jsonl
from pipeline.data.splitting import label_names_for, to_examples
from pipeline.errors import DataError
from scripts.tiny_project import TINY_CSV, sh, tiny_params_tree, write_project
from stages import prepare_data

INFERRED = DataConfig(source="csv", path="data.csv", label_names=None)
REAL_TEXT = {
    "german": "Der Umsatz stieg im dritten Quartal um 5 % auf 12,3 Mio. EUR.",
    "chinese": "公司第三季度营业利润增长百分之五。",
    "arabic": "ارتفعت أرباح الشركة التشغيلية في الربع الثالث.",
    "russian": "Операционная прибыль компании выросла на 5 %.",
    "greek": "Τα καθαρά κέρδη της εταιρείας αυξήθηκαν.",
    "hindi": "कंपनी का परिचालन लाभ तीसरी तिमाही में बढ़ा।",
}


def random_bytes(size: int = 6 * 1024, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------- garbage is refused


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("random.txt", random_bytes(), "control or unprintable characters"),
        ("random.csv", b"text,label\n" + random_bytes(), "control or unprintable characters"),
        ("news.csv.gz.csv", gzip.compress(TINY_CSV.read_bytes()), "control or unprintable characters"),
        ("numbers.txt", "\n".join(f"{i * 37 % 1000}.{i} -- {i * 11}" for i in range(50)).encode(), "have no letter"),
        ("escaped.jsonl", "".join(json.dumps({"text": "\x00\x01\x02\x1b[0m\x7f" * 10}) + "\n" for _ in range(20)).encode(),
         "control or unprintable characters"),
    ],
    ids=["6 KB random bytes", "random bytes after a CSV header", "gzip-compressed CSV", "no letters", "JSON-escaped controls"],
)
def test_a_transfer_file_that_is_not_text_is_refused(tiny_params, name, content, problem):
    params = tiny_params()
    prepare_data.STAGE.execute(params)
    before = (params.path(params.paths.prepared) / "train.jsonl").read_bytes()
    (params.root / "data" / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"data/{name}.*not (a text file|text): .*{problem}"):
        prepare_data.STAGE.execute(tiny_params(transfer={"path": f"data/{name}", "format": "jsonl" if "jsonl" in name else "auto"}))
    assert (params.path(params.paths.prepared) / "train.jsonl").read_bytes() == before, "nothing overwritten"


def test_a_data_file_of_random_bytes_is_refused_at_the_command_line(tmp_path, tiny_bert):
    root = write_project(tmp_path / "project", tiny_params_tree(tiny_bert))
    (root / "data" / "tiny.csv").write_bytes(random_bytes(seed=1))
    result = sh([sys.executable, "-m", "stages.prepare_data"], root, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: prepare_data: ") and "data/tiny.csv is not a text file" in last
    assert "save" in last.lower() and "UTF-8" in last
    assert not (root / "data" / "prepared").exists()


@pytest.mark.parametrize("language", list(REAL_TEXT))
def test_real_text_in_any_script_is_read(tiny_params, language):
    params = tiny_params()
    prepare_data.STAGE.execute(params)
    lines = [f"{REAL_TEXT[language]} ({word})" for word in ("eins", "zwei", "drei")]
    (params.root / "data" / "t.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_data.STAGE.execute(tiny_params(transfer={"path": "data/t.txt"}))
    info = json.loads((params.path(params.paths.prepared) / "manifest.json").read_text())["transfer"]
    assert info["rows_read"] == 3


def test_utf16_with_a_bom_is_text(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\nUmsatz stieg,positive\nGewinn fiel,negative\n".encode("utf-16"))
    examples = to_examples(read_csv(path, INFERRED, TaskConfig()), INFERRED, TaskConfig())
    assert [e.text for e in examples] == ["Umsatz stieg", "Gewinn fiel"]


# --------------------------------------------------------------------------- one class, two spellings


def labelled(tmp_path, labels: list[str]) -> list:
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"Text number {i},{label}\n" for i, label in enumerate(labels)),
                    encoding="utf-8")
    return to_examples(read_csv(path, INFERRED, TaskConfig()), INFERRED, TaskConfig())


@pytest.mark.parametrize(
    "labels",
    [
        ["Positive", "positive", "negative"],
        ["very negative", "very  negative", "positive"],
        ["négatif", "negatif", "positif"],
        ["ｐｏｓｉｔｉｖｅ", "positive", "negative"],
        ["Neutral", "NEUTRAL", "neutral"],
    ],
    ids=["case", "inner spaces", "accents", "full-width", "three spellings"],
)
def test_labels_differing_only_by_spelling_are_refused(tmp_path, labels):
    examples = labelled(tmp_path, labels)
    with pytest.raises(DataError, match=r"differ only by case, spacing or accents.*data\.label_map, e\.g\. -S "
                                        r"'data\.label_map=\{.*data\.keep_similar_labels=true"):
        label_names_for(examples, INFERRED)


def test_listed_label_names_differing_only_by_case_are_refused():
    cfg = DataConfig(source="csv", path="data.csv", label_names=["positive", "Positive", "negative"])
    with pytest.raises(DataError, match=r"data\.label_names lists labels \['positive', 'Positive'\]"):
        label_names_for([], cfg)


def test_multi_label_spellings_are_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"Text {i}", "label": ["Earnings", "earnings"][i % 2:]}) + "\n"
                            for i in range(4)))
    cfg = DataConfig(source="jsonl", path="data.jsonl", label_names=None)
    task = TaskConfig(type="multi_label")
    with pytest.raises(DataError, match=r"\['Earnings', 'earnings'\] that differ only by case"):
        label_names_for(to_examples(read_jsonl(path, cfg, task), cfg, task), cfg)


def test_a_label_map_or_the_opt_in_accepts_them(tmp_path, caplog):
    examples = labelled(tmp_path, ["Positive", "positive", "negative"])
    mapped = DataConfig(source="csv", path="data.csv", label_names=None, label_map={"Positive": "positive"})
    path = tmp_path / "data.csv"
    assert label_names_for(to_examples(read_csv(path, mapped, TaskConfig()), mapped, TaskConfig()), mapped) == [
        "negative", "positive"]
    opted = DataConfig(source="csv", path="data.csv", label_names=None, keep_similar_labels=True)
    with caplog.at_level(logging.WARNING):
        assert label_names_for(examples, opted) == ["Positive", "negative", "positive"]
    assert "stay separate classes (data.keep_similar_labels=true)" in caplog.text


def test_the_stage_refuses_them_before_writing(tiny_params):
    rows = TINY_CSV.read_text(encoding="utf-8").replace(",positive\n", ",Positive\n", 3)
    (tiny_params().root / "data" / "tiny.csv").write_text(rows, encoding="utf-8")
    params = tiny_params(data={"label_names": None})
    with pytest.raises(DataError, match=r"\['Positive', 'positive'\]"):
        prepare_data.STAGE.execute(params)
    assert not params.path(params.paths.prepared).exists()
