"""Bad model directories, tokenizers and splits: a clear error, and existing outputs untouched.

Every case of the bad-input matrix, with its message, is listed in tests/README.md.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

from pipeline.config import params_from_dict
from pipeline.errors import ConfigError, DataError, FinCompressError, ModelError
from pipeline.models import load_trained
from stages import distill_vanilla, prune, student_baseline, verify_teacher
from tests.helpers import copy_project


def snapshot(root: Path) -> dict[str, str]:
    """Hash of every file under root (to prove nothing already written changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "mlartifacts" not in p.parts and ".cache" not in p.parts
    }


@pytest.fixture
def project(trained_project, tmp_path):
    """A copy of the trained tiny project with a finished student_baseline already in place."""
    params = copy_project(trained_project, tmp_path)
    student_baseline.STAGE.execute(params)
    return params


def fails_cleanly(params, module, stage, error, message):
    before = snapshot(params.root)
    with pytest.raises(error, match=message):
        module.STAGE.execute(params)
    assert snapshot(params.root) == before, "a failed stage changed existing outputs"


def test_teacher_directory_missing(project):
    shutil.rmtree(project.path(project.paths.teacher))
    fails_cleanly(project, student_baseline, "student_baseline", ModelError, "model directory not found: .*teacher")


def test_teacher_weights_not_safetensors(project):
    teacher = project.path(project.paths.teacher)
    (teacher / "model.safetensors").rename(teacher / "pytorch_model.bin")
    fails_cleanly(project, verify_teacher, "verify_teacher", ModelError,
                  r"not a complete model directory \(weights are read from safetensors only\): missing \['model.safetensors'\]")


def test_corrupt_model_config(project):
    (project.path(project.paths.teacher) / "config.json").write_text("{not json")
    fails_cleanly(project, verify_teacher, "verify_teacher", ModelError, "could not load the model")


def test_tokenizer_from_another_model(project, tmp_path):
    teacher = project.path(project.paths.teacher)
    vocab = (teacher / "vocab.txt").read_text().splitlines()
    bigger = tmp_path / "vocab.txt"
    bigger.write_text("\n".join(vocab + [f"extra{i}" for i in range(50)]) + "\n")
    for name in ("tokenizer.json", "vocab.txt"):
        (teacher / name).unlink()
    BertTokenizerFast(vocab_file=str(bigger)).save_pretrained(teacher)
    fails_cleanly(project, distill_vanilla, "distill_vanilla", ModelError,
                  "the tokenizer has .* tokens but the model's embeddings only")


def test_teacher_trained_for_other_labels(project):
    teacher = project.path(project.paths.teacher)
    model = load_trained(teacher)  # the same encoder with a two-class head, as if trained on other data
    model.classifier = torch.nn.Linear(model.config.hidden_size, 2)
    model.config.id2label, model.config.label2id = {0: "down", 1: "up"}, {"down": 0, "up": 1}
    model.save_pretrained(teacher, safe_serialization=True)
    fails_cleanly(project, verify_teacher, "verify_teacher", ModelError, "predicts 2 classes but the data has 3")


def test_empty_test_split(project):
    (project.path(project.paths.prepared) / "test.jsonl").write_text("")
    fails_cleanly(project, student_baseline, "student_baseline", DataError, r"test\.jsonl is empty")


def test_prepared_data_missing(project):
    shutil.rmtree(project.path(project.paths.prepared))
    fails_cleanly(project, verify_teacher, "verify_teacher", DataError, "run the prepare_data stage first")


def test_student_init_without_a_tokenizer(project, tmp_path):
    """Another vocabulary is fine (the student keeps its own tokenizer), but then it needs one."""
    other = tmp_path / "other_model"
    model = load_trained(project.path(project.paths.teacher))
    model.resize_token_embeddings(model.config.vocab_size + 7)
    model.save_pretrained(other, safe_serialization=True)
    tree = project.model_dump(mode="json")
    tree["student"]["init"] = str(other)
    params = params_from_dict(tree, root=project.root)
    fails_cleanly(params, distill_vanilla, "distill_vanilla", ConfigError,
                  r"student.init='.*other_model': its tokenizer could not be loaded")


def test_prune_source_missing(project):
    tree = project.model_dump(mode="json")
    tree["prune"]["source"] = "models/no_such_student"
    params = params_from_dict(tree, root=project.root)
    fails_cleanly(params, prune, "prune", FinCompressError, "model directory not found: .*no_such_student")
