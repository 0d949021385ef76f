"""The multi-label family through `dvc repro`. Its own file so pytest-xdist runs it beside the
single-label DAG (they are the two longest tests)."""

from __future__ import annotations

import json

import pytest

from scripts.tiny_project import dvc, init_repo, write_project
from tests.helpers import TOPICS, multilabel_tree, write_tiny_topics

pytestmark = pytest.mark.slow


def test_multilabel_family_through_dvc_repro(tmp_path, tiny_bert):
    root = write_project(tmp_path / "project", multilabel_tree(tiny_bert))
    write_tiny_topics(root / "data" / "topics.csv")
    init_repo(root)
    dvc(root, "repro")
    family = json.loads((root / "reports" / "family.json").read_text())
    assert {row["name"] for row in family} >= {"teacher", "student_onnx_int8"}
    info = json.loads((root / "models" / "student_onnx" / "int8" / "checkpoint_info.json").read_text())
    assert set(info["test"]["per_label_f1"]) == set(TOPICS)
    config = json.loads((root / "models" / "student_onnx" / "int8" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and len(config["label_thresholds"]) == 3
