"""Helpers several test modules share (fixtures live in conftest.py; the tiny project itself in
scripts/tiny_project.py, which scripts/prefect_e2e.py builds on too)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

from scripts.tiny_project import REPO, TINY_CSV, tiny_params_tree

PHRASEBANK = REPO.parent / "shared" / "data" / "financial_phrasebank"


def copy_project(params, root: Path, dirs: tuple[str, ...] = ("data", "models", "reports"), **sections: dict[str, Any]):
    """A copy of a tiny project's `dirs` under `root`, with params sections updated, e.g.
    copy_project(p, tmp_path, verify_teacher={"min_macro_f1": 0.9})."""
    from pipeline.config import params_from_dict

    for name in dirs:
        if (params.root / name).is_dir():
            shutil.copytree(params.root / name, root / name, dirs_exist_ok=True)
    tree = params.model_dump(mode="json")
    for name, values in sections.items():
        tree[name].update(values)
    return params_from_dict(tree, root=root)


def export_tiny_classifier(tiny_bert: Path, root: Path, labels: list[str]) -> Path:
    """The tiny BERT with a (random) classification head over `labels`, exported to ONNX in root/onnx."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.export.onnx_export import export_fp32

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model.save_pretrained(root / "source", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(root / "source")
    export_fp32(root / "source", root / "onnx", opset=17, max_length=32)
    return root / "onnx"


def spellings(text: str) -> dict[str, str]:
    """The same sentence as a hostile user (or an augmentation) might spell it: every one has the text's
    leak key (pipeline/data/normalize.py), none is byte-equal to it."""
    full_width = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    return {
        "upper case, doubled spaces": "  ".join(text.upper().split()),
        "title case": text.title(),
        "tabs and non-breaking spaces": text.replace(" ", "\t", 3).replace(" ", "\u00a0", 3),
        "full-width (NFKC)": full_width,
        "accents added": text.replace("e", "\u00e9").replace("a", "a\u0301"),
        "zero-width space and soft hyphen": text.replace(" ", " \u200b", 2).replace("o", "o\u00ad", 1),
        "punctuation spacing removed": text.replace(" .", ".").replace(" %", "%").replace(" ,", ","),
        "punctuation spacing added": text.replace(".", " . ").replace(",", " , "),
        "line breaks": text.replace(" ", "\n", 2),
    }


# --------------------------------------------------------------------------- multi-label

TOPICS = ["corporate", "outlook", "results"]
RULES = {
    "results": ("profit", "sales", "revenue", "earnings", "loss", "margin", "cash"),
    "outlook": ("forecast", "outlook", "guidance", "expectations"),
    "corporate": ("contract", "order", "board", "appoint", "meeting", "jobs", "dividend", "name", "office", "plant"),
}


def write_tiny_topics(path: Path) -> None:
    """The tiny corpus tagged with topics by keyword (test data only)."""
    with open(TINY_CSV, newline="") as handle, open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "topics"])
        for row in csv.DictReader(handle):
            text = row["text"].lower()
            writer.writerow([row["text"], ";".join(k for k, words in RULES.items() if any(w in text for w in words))])


def multilabel_tree(tiny_bert, **task):
    """Tiny params for the topics corpus of write_tiny_topics, as a multi-label task."""
    tree = tiny_params_tree(tiny_bert, data_path="data/topics.csv")
    tree["task"].update(type="multi_label", tune_thresholds=True, pos_weight="auto", **task)
    tree["data"].update(label_column="topics", label_names=TOPICS)
    return tree


# --------------------------------------------------------------------------- MLflow


def mlflow_runs(pipeline_run: str) -> list[Any]:
    """The MLflow runs of the stages of one pipeline run (tagged `pipeline_run`)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("fincompress")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.pipeline_run = '{pipeline_run}'")


def compress_that_kills_its_process(params, kd_method: str) -> None:
    """A search `compress` whose worker process dies outright (as when killed or out of memory); module
    level, so a spawned search worker can unpickle it."""
    import os

    os._exit(3)


# --------------------------------------------------------------------------- served models without torch


def imported_top_level(stderr: str) -> set[str]:
    """The top-level packages a `python -X importtime` process imported."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps({
    "pipeline_file": sys.modules["pipeline"].__file__,
    "frame": model.predict(pd.DataFrame({"text": texts})).to_dict("records"),
    "list": model.predict(texts).to_dict("records"),
}))
"""
