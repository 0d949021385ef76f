"""Shared fixtures: a tiny random BERT with its own small WordPiece vocabulary, a tiny labelled
corpus, tiny params, and a temporary MLflow database. Everything runs on the CPU in seconds. The tiny
project is built by scripts/tiny_project.py; helpers that are not fixtures are in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.tiny_project import TINY_CSV, make_tiny_bert, read_tiny_texts, tiny_params_tree

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Tiny models: torch's thread pool costs more than it saves, and on a busy 2-core machine its
# spinning threads made a one-second training take thirty. Stages started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest files start first (a test file stays on one xdist worker): started last, the tiny
# `dvc repro` of test_dvc_pipeline kept one worker busy minutes after the other was done.
LONGEST_FILES_FIRST = ("test_dvc_pipeline.py", "test_flow.py", "test_reliability.py", "test_scaleout.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


@pytest.fixture(scope="session", autouse=True)
def mlflow_db(tmp_path_factory) -> str:
    """Every test tracks into one temporary sqlite database, never the project's."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), read_tiny_texts())


@pytest.fixture
def tiny_params(tmp_path, tiny_bert):
    """Params for a fresh tiny project in tmp_path (code not copied: stages are called in-process)."""
    from pipeline.config import params_from_dict

    (tmp_path / "data").mkdir()
    shutil.copy(TINY_CSV, tmp_path / "data" / "tiny.csv")

    def make(**sections: dict[str, Any]):
        tree = tiny_params_tree(tiny_bert)
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        return params_from_dict(tree, root=tmp_path)

    return make


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, tiny_bert):
    """A tiny project after prepare_data, train_teacher, verify_teacher and teacher_logits (shared, read-only)."""
    from pipeline.config import params_from_dict
    from stages import prepare_data, teacher_logits, train_teacher, verify_teacher

    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    shutil.copy(TINY_CSV, root / "data" / "tiny.csv")
    tree = tiny_params_tree(tiny_bert)
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    params = params_from_dict(tree, root=root)
    prepare_data.STAGE.execute(params)
    train_teacher.STAGE.execute(params)
    verify_teacher.STAGE.execute(params)
    teacher_logits.STAGE.execute(params)
    return params
