"""train_teacher and verify_teacher on the tiny model, and their MLflow runs."""

from __future__ import annotations

import mlflow
import pytest
import torch

from pipeline.errors import GateError, ModelError
from pipeline.evaluation.record import ModelRecord
from pipeline.models import load_trained, resolve_model_source
from stages import verify_teacher
from tests.helpers import copy_project


def test_teacher_checkpoint_is_complete(trained_project):
    teacher = trained_project.path(trained_project.paths.teacher)
    assert (teacher / "model.safetensors").is_file()
    assert not list(teacher.glob("*.bin")), "weights must be safetensors only"
    record = ModelRecord.read(teacher)
    assert record.member == "teacher" and record.source == trained_project.teacher.model
    assert record.num_parameters > 0 and record.training_seconds > 0
    assert record.size_mb == pytest.approx((teacher / "model.safetensors").stat().st_size / 1e6, abs=1e-3)
    assert record.params["teacher"]["epochs"] == trained_project.teacher.epochs
    curve = trained_project.path(trained_project.paths.curves) / "train_teacher.csv"
    header, *rows = curve.read_text().splitlines()
    assert "eval_macro_f1" in header and len(rows) == trained_project.teacher.epochs
    # It learned the easy tiny task: better than always predicting the majority class.
    assert record.validation["macro_f1"] > 0.4


def runs_of(params, stage):
    mlflow.set_tracking_uri(mlflow.get_tracking_uri())
    return mlflow.search_runs(
        experiment_names=[params.tracking.experiment], filter_string=f"tags.stage = '{stage}'"
    )


def test_runs_are_tracked_with_tags(trained_project):
    from pipeline.tracking import git_commit, pipeline_run_id

    this_run = pipeline_run_id(trained_project, git_commit(trained_project.root))
    runs = runs_of(trained_project, "train_teacher")
    runs = runs[runs["tags.pipeline_run"] == this_run]
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["tags.family_member"] == "teacher"
    assert run["tags.data_hash"] and run["tags.pipeline_run"]
    assert "metrics.test_macro_f1" in runs.columns and "params.teacher.learning_rate" in runs.columns
    # The three stages of one execution share the pipeline_run tag.
    same = mlflow.search_runs(
        experiment_names=[trained_project.tracking.experiment],
        filter_string=f"tags.pipeline_run = '{run['tags.pipeline_run']}'",
    )
    assert {"prepare_data", "train_teacher", "verify_teacher"} <= set(same["tags.stage"])


def test_gate_passes(trained_project, tmp_path):
    params = copy_project(trained_project, tmp_path, ("data", "models"), verify_teacher={"min_macro_f1": 0.4})
    result = verify_teacher.STAGE.execute(params)
    assert result["passed"] and result["validation_macro_f1"] >= 0.4
    assert len(result["confusion_matrix"]) == 3


def test_gate_fails_below_threshold_and_marks_the_run_failed(trained_project, tmp_path):
    params = copy_project(trained_project, tmp_path, ("data", "models"), verify_teacher={"min_macro_f1": 0.999})
    with pytest.raises(GateError, match=r"below the threshold 0.999.*Per-class F1"):
        verify_teacher.STAGE.execute(params)
    assert not (tmp_path / "reports" / "metrics" / "verify_teacher.json").exists()
    latest = runs_of(params, "verify_teacher").iloc[0]
    assert latest["status"] == "FAILED"


def test_gate_fails_on_a_single_class_teacher(trained_project, tmp_path):
    params = copy_project(trained_project, tmp_path, ("data", "models"), verify_teacher={"min_macro_f1": 0.0})
    teacher_dir = params.path(params.paths.teacher)
    model = load_trained(teacher_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    model.save_pretrained(teacher_dir, safe_serialization=True)
    with pytest.raises(GateError, match="predicts 'neutral' for every validation example"):
        verify_teacher.STAGE.execute(params)


def test_model_sources(tmp_path):
    assert resolve_model_source("minilm-l6").endswith("model")
    assert resolve_model_source("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(ModelError, match="model directory not found"):
        resolve_model_source("./no/such/dir")
    with pytest.raises(ModelError, match="not a complete model directory"):
        load_trained(tmp_path)
