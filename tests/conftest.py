"""Shared fixtures: a tiny random BERT with its own small WordPiece vocabulary, a tiny labelled
corpus, tiny params, and a temporary MLflow database. Everything runs on the CPU in seconds."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CSV = REPO / "tests" / "data" / "tiny_sentiment.csv"
PHRASEBANK = REPO.parent / "shared" / "data" / "financial_phrasebank"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Tiny models: torch's thread pool costs more than it saves, and on a busy 2-core machine its
# spinning threads made a one-second training take thirty. Stages started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def mlflow_db(tmp_path_factory) -> str:
    """Every test tracks into one temporary sqlite database, never the project's."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def tiny_vocabulary(texts: list[str]) -> list[str]:
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    chars = sorted({c for w in words for c in w})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars] + [
        w for w in words if len(w) > 1
    ]


def make_tiny_bert(directory: Path, texts: list[str], seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32, 2 heads) with a WordPiece vocabulary written for `texts`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tiny_vocabulary(texts)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def read_tiny_texts() -> list[str]:
    with open(TINY_CSV, newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), read_tiny_texts())


def tiny_params_tree(tiny_bert: Path, data_path: str = "data/tiny.csv") -> dict[str, Any]:
    """A complete params tree sized for seconds, not minutes."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    budget = {"batch_size": 8, "eval_batch_size": 32, "seed": 0, "warmup_ratio": 0.0}
    tree["data"].update(source="csv", path=data_path, validation_fraction=0.2, test_fraction=0.2, seed=0)
    tree["teacher"].update(model=str(tiny_bert), epochs=20, learning_rate=3e-3, max_length=32, **budget)
    tree["verify_teacher"]["min_macro_f1"] = 0.0
    tree["student"].update(num_layers=1, epochs=2, learning_rate=3e-3, **budget)
    tree["prune"].update(importance_batches=2, vocab_keep_top=5)
    tree["prune"]["recovery"].update(epochs=1, learning_rate=1e-3, **budget)
    tree["benchmark"].update(min_runs=5, min_seconds=0.0, warmup_runs=1, rounds=2, throughput_batches=1,
                             throughput_batch_size=4)
    tree["evaluation"]["bootstrap_samples"] = 50
    tree["report"]["sla"].update(max_latency_ms=1000.0, min_f1_retention=0.0)
    tree["flow"].update(retries=0, retry_delay_seconds=0)
    return tree


def write_project(root: Path, tree: dict[str, Any]) -> Path:
    """Lay out a runnable project in `root`: code, dvc.yaml, tiny data, params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "data").mkdir(exist_ok=True)
    shutil.copy(TINY_CSV, root / "data" / "tiny.csv")
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return root


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
    """A tiny project after prepare_data, train_teacher and verify_teacher (shared, read-only)."""
    from pipeline.config import params_from_dict
    from stages import prepare_data, train_teacher, verify_teacher

    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    shutil.copy(TINY_CSV, root / "data" / "tiny.csv")
    tree = tiny_params_tree(tiny_bert)
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    params = params_from_dict(tree, root=root)
    prepare_data.STAGE.execute(params)
    train_teacher.STAGE.execute(params)
    verify_teacher.STAGE.execute(params)
    return params


# --------------------------------------------------------------------------- running commands


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
}


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


def sh(
    args: list[str], cwd: Path, check: bool = True, timeout: float = 1200, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's bin first on PATH (dvc.yaml says `python -m ...`)."""
    env = {
        **os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {}),
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def init_repo(root: Path) -> Path:
    """Make `root` a committed git + DVC repository (DVC experiments and the queue need commits)."""
    sh(["git", "init", "-q"], root)
    sh([sys.executable, "-m", "dvc", "init", "-q"], root)
    sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "tiny project"], root)
    return root


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], root, check)
