"""Classify texts with an exported ONNX model (or a reference member's directory: pipeline/baselines/).

    python -m pipeline.export.predict --model models/student_onnx/int8 "Profit rose." "Sales fell."
    python -m pipeline.export.predict --model models/student_onnx/int8 --file headlines.txt --json
    cat headlines.txt | python -m pipeline.export.predict --model models/student_onnx/int8

Runs on ONNX Runtime and the `tokenizers` library only (torch and transformers are never imported,
so a serving image needs neither). Texts come from the arguments, or --file, or standard input, one
per line; blank lines are skipped. Each text gets its label and every class probability, or one
JSON object per line with --json. Multi-label models (config.json problem_type
multi_label_classification) get sigmoid probabilities and every label at or above its threshold:
config.json's label_thresholds when present, else --threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.baselines.classifiers import ReferenceClassifier, is_reference, load_reference
from pipeline.errors import DataError, FinCompressError, log_file_for, unexpected_error_message
from pipeline.export.onnx import OnnxClassifier

Classifier = OnnxClassifier | ReferenceClassifier


def _int_at_least(minimum: int):
    def integer(text: str) -> int:  # argparse names the function in its "invalid integer value" error
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported model directory (model.onnx, config, tokenizer)")
    parser.add_argument("texts", nargs="*", help="texts to classify (default: --file, else standard input)")
    parser.add_argument("--file", type=Path, help="read texts from this file, one per line")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    parser.add_argument(
        "--batch-size", type=_int_at_least(1), default=32, help="texts per inference call (default 32)"
    )
    parser.add_argument(
        "--threads", type=_int_at_least(0), default=0, help="ONNX Runtime intra-op threads (default 0: all cores)"
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5,
        help="multi-label models without label_thresholds in config.json: the probability a label needs "
        "(default 0.5)",
    )
    return parser


def _utf8_lines(raw: bytes, source: str) -> list[str]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{source}: line {line} is not UTF-8 (byte 0x{raw[error.start]:02x}); save the texts as UTF-8, "
            "e.g. iconv -f WINDOWS-1252 -t UTF-8"
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_texts(texts: list[str], file: Path | None) -> list[str]:
    """Texts from the arguments, else the file, else standard input; blank lines dropped."""
    if texts:
        lines = texts
    elif file is not None:
        if not file.is_file():
            raise DataError(f"--file: file not found: {file}")
        lines = _utf8_lines(file.read_bytes(), f"--file {file}")
    elif sys.stdin.isatty():
        raise DataError("no texts: pass them as arguments, with --file, or on standard input (one per line)")
    else:
        lines = _utf8_lines(sys.stdin.buffer.read(), "standard input")
    kept = [line.strip() for line in lines if line.strip()]
    if not kept:
        raise DataError("no texts to classify: the input is empty")
    return kept


def load_classifier(model_dir: str | Path, threads: int = 0, threshold: float = 0.5) -> Classifier:
    """The classifier in `model_dir`: an exported ONNX model, or a reference member (tfidf, static),
    which answers the same way (`threads` and `threshold` are the ONNX model's; a reference member
    decides by its own rule)."""
    if is_reference(Path(model_dir)):
        return load_reference(Path(model_dir))
    return OnnxClassifier.load(model_dir, threads, threshold=threshold)


def classify(classifier: Classifier, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """One record per text, as --json prints it: the text, its `label` (multi-label: its `labels`)
    and every class probability rounded to 6 decimals. The MLflow pyfunc answers with these too."""
    logits = classifier.logits(texts, batch_size)
    names = classifier.label_names
    multi = classifier.task_type == "multi_label"
    records = []
    for text, probs, decision in zip(texts, classifier.probabilities(logits), classifier.decide(logits)):
        by_name = {name: round(float(p), 6) for name, p in zip(names, probs)}
        if multi:
            records.append({"text": text, "labels": [n for n, on in zip(names, decision) if on], "probabilities": by_name})
        else:
            records.append({"text": text, "label": names[int(decision)], "probabilities": by_name})
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        texts = read_texts(args.texts, args.file)
        classifier = load_classifier(args.model, args.threads, args.threshold)
        records = classify(classifier, texts, args.batch_size)
    except FinCompressError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug or the environment: a message here, the traceback in a file
        print(f"error: {unexpected_error_message('predict', error, log_file_for('predict', Path(tempfile.gettempdir())))}", file=sys.stderr)
        return 1
    for record in records:
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            label = (",".join(record["labels"]) or "-") if "labels" in record else record["label"]
            shown = " ".join(f"{name}={p:.3f}" for name, p in record["probabilities"].items())
            print(f"{label}\t{shown}\t{record['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
