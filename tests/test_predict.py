"""The predict command on a tiny exported model: text arguments, --file, stdin, --json, multi-label
thresholds, its error cases, and that it never imports torch or transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.export.onnx import OnnxClassifier
from pipeline.export.predict import main
from tests.helpers import export_tiny_classifier

REPO = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]
TEXTS = ["Operating profit rose sharply in the third quarter.", "Net sales fell.", "The company held its AGM."]


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with a (random) 3-class head, exported to ONNX."""
    return export_tiny_classifier(tiny_bert, tmp_path_factory.mktemp("predict"), LABELS)


def expected_probabilities(model_dir: Path, texts: list[str]) -> np.ndarray:
    classifier = OnnxClassifier.load(model_dir)
    return classifier.probabilities(classifier.logits(texts))


def test_text_arguments(model_dir, capsys):
    assert main(["--model", str(model_dir), *TEXTS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(TEXTS)
    for line, text, probs in zip(lines, TEXTS, expected_probabilities(model_dir, TEXTS)):
        label, shown, echoed = line.split("\t")
        assert echoed == text and label == LABELS[int(probs.argmax())]
        assert shown == " ".join(f"{name}={p:.3f}" for name, p in zip(LABELS, probs))


def test_file_json_and_batching(model_dir, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join([TEXTS[0], "", "  ", *TEXTS[1:]]) + "\n")  # blank lines are skipped
    assert main(["--model", str(model_dir), "--file", str(path), "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in rows] == TEXTS
    for row, probs in zip(rows, expected_probabilities(model_dir, TEXTS)):
        assert list(row["probabilities"]) == LABELS
        assert list(row["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == LABELS[int(probs.argmax())]


def test_stdin_in_a_fresh_interpreter_without_torch(model_dir):
    """Run as a user would; -X importtime lists every module the process imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline.export.predict", "--model", str(model_dir), "--json"],
        input="\n".join(TEXTS) + "\n", capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["text"] for row in rows] == TEXTS
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "onnxruntime" in imported and "tokenizers" in imported  # the listing is real
    assert "torch" not in imported and "transformers" not in imported and "optimum" not in imported


def test_multi_label_uses_sigmoid_and_per_label_thresholds(model_dir, tmp_path, capsys):
    multi = tmp_path / "multi"
    shutil.copytree(model_dir, multi)
    config = json.loads((multi / "config.json").read_text())
    # 0.0: always predicted; 1.0: never (a sigmoid stays below 1 here); 0.5: by the probability.
    config.update(problem_type="multi_label_classification", label_thresholds=[0.0, 1.0, 0.5])
    (multi / "config.json").write_text(json.dumps(config))
    assert main(["--model", str(multi), "--json", *TEXTS]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    logits = OnnxClassifier.load(multi).logits(TEXTS)
    for row, row_logits in zip(rows, logits):
        sigmoid = 1 / (1 + np.exp(-row_logits.astype(np.float64)))
        assert list(row["probabilities"].values()) == pytest.approx(sigmoid.tolist(), abs=1e-6)
        expected = ["negative"] + (["positive"] if sigmoid[2] >= 0.5 else [])
        assert row["labels"] == expected


def broken_copy(model_dir: Path, root: Path, case: str) -> Path:
    target = root / case
    if case == "missing_dir":
        return target
    shutil.copytree(model_dir, target)
    if case == "no_model":
        (target / "model.onnx").unlink()
    elif case == "not_onnx":
        (target / "model.onnx").write_bytes(b"this is not an ONNX model")
    elif case == "no_tokenizer":
        (target / "tokenizer.json").unlink()
    return target


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_dir", "model directory not found"),
        ("no_model", "has no model.onnx"),
        ("not_onnx", "is not a valid ONNX model"),
        ("no_tokenizer", "has no tokenizer.json"),
    ],
)
def test_model_errors_exit_nonzero_with_a_clear_message(model_dir, tmp_path, capsys, case, message):
    target = broken_copy(model_dir, tmp_path, case)
    assert main(["--model", str(target), "some text"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err


def test_input_errors(model_dir, tmp_path, capsys):
    assert main(["--model", str(model_dir), "--file", str(tmp_path / "absent.txt")]) == 1
    assert "--file: file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["--model", str(model_dir), "--file", str(empty)]) == 1
    assert "no texts to classify" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error
        main(["--model", str(model_dir), "--batch-size", "0", "text"])
    assert exit_info.value.code == 2
