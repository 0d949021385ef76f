"""Reliability: resume after SIGKILL, atomic outputs, tracking outages, determinism, NaN losses.

The bad-input matrix (every case, its message, and where it is tested) is in tests/README.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.errors import FinCompressError
from pipeline.models import load_trained, state_fingerprint
from pipeline.training import loss as training_loss
from scripts.tiny_project import sh, tiny_params_tree, write_project
from stages import prepare_data, train_teacher


def project(root: Path, tiny_bert: Path, **teacher) -> Path:
    tree = tiny_params_tree(tiny_bert)
    tree["teacher"].update(teacher)
    write_project(root, tree)
    sh([sys.executable, "-m", "stages.prepare_data"], root)
    return root


def stage_command(root: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_training_resumes_after_sigkill(tmp_path, tiny_bert):
    """Kill train_teacher with SIGKILL after its first checkpoint; the re-run resumes from it and
    ends where an uninterrupted run ends."""
    killed = project(tmp_path / "killed", tiny_bert, save_steps=10)
    scratch = killed / ".cache" / "checkpoints" / "train_teacher"
    process = stage_command(killed, "train_teacher")
    deadline = time.time() + 300
    # A checkpoint is complete once its digests are recorded, after the Trainer's own files.
    while not list(scratch.glob("checkpoint-*/fincompress-digests.json")):
        assert process.poll() is None, "training finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "models" / "teacher").exists(), "a killed stage must not leave a model behind"
    resumed = sh([sys.executable, "-m", "stages.train_teacher"], killed)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert not scratch.exists(), "checkpoints are removed once the model is in place"

    fresh = project(tmp_path / "fresh", tiny_bert, save_steps=10)
    sh([sys.executable, "-m", "stages.train_teacher"], fresh)
    got = json.loads((killed / "reports" / "metrics" / "train_teacher.json").read_text())
    expected = json.loads((fresh / "reports" / "metrics" / "train_teacher.json").read_text())
    for key in ("validation_macro_f1", "test_macro_f1"):
        assert got[key] == expected[key], key  # the seeded sampler makes the resumed run exact


def test_same_params_and_seed_reproduce_the_same_teacher(tmp_path, tiny_params):
    params = tiny_params()
    prepare_data.STAGE.execute(params)
    first = train_teacher.STAGE.execute(params)
    weights = state_fingerprint(load_trained(params.path(params.paths.teacher)))
    second = train_teacher.STAGE.execute(params)
    for key in ("validation_macro_f1", "test_macro_f1", "test_macro_f1_ci95_low", "num_parameters"):
        assert first[key] == second[key], key
    assert state_fingerprint(load_trained(params.path(params.paths.teacher))) == weights


def test_unreachable_tracking_server_fails_before_training(tmp_path, tiny_params, monkeypatch):
    params = tiny_params()
    prepare_data.STAGE.execute(params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    started = time.time()
    with pytest.raises(FinCompressError, match=r"MLflow tracking server http://127\.0\.0\.1:9 is unreachable"):
        train_teacher.STAGE.execute(params)
    assert time.time() - started < 30
    assert not params.path(params.paths.checkpoints).exists(), "no training may start"
    assert not params.path(params.paths.teacher).exists()


def test_nan_loss_stops_training_and_marks_the_run_failed(tmp_path, tiny_params, monkeypatch):
    params = tiny_params()
    prepare_data.STAGE.execute(params)
    monkeypatch.setattr(training_loss, "hard_loss", lambda logits, labels, *args: (logits * float("nan")).sum())
    with pytest.raises(FinCompressError, match="training loss became nan at step 0"):
        train_teacher.STAGE.execute(params)
    assert not params.path(params.paths.teacher).exists()
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment],
                              filter_string="tags.stage = 'train_teacher'", order_by=["start_time DESC"])
    assert runs.iloc[0]["status"] == "FAILED"


def test_a_killed_write_leaves_the_previous_output_and_is_cleaned_up(tmp_path):
    from pipeline.io import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("previous")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f".model.tmp-{dead}-x1y2").mkdir()  # what a killed writer leaves (its owner is gone)
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.slow
def test_dvc_lock_held_by_another_run(tmp_path, tiny_bert):
    from zc.lockfile import LockFile

    from scripts.tiny_project import dvc, init_repo

    root = write_project(tmp_path / "project", tiny_params_tree(tiny_bert))
    init_repo(root)
    lock = LockFile(str(root / ".dvc" / "tmp" / "lock"))
    try:
        result = dvc(root, "repro", check=False)
    finally:
        lock.close()
    assert result.returncode != 0
    assert "Unable to acquire lock" in result.stderr + result.stdout
    assert not (root / "data" / "prepared").exists()


def test_params_file_is_validated_before_any_work(tmp_path, tiny_bert):
    tree = tiny_params_tree(tiny_bert)
    tree["teacher"]["epochs"] = -1
    root = write_project(tmp_path / "project", tree)
    result = sh([sys.executable, "-m", "stages.prepare_data"], root, check=False)
    assert result.returncode == 1
    assert "teacher.epochs: Input should be greater than 0" in result.stderr
    assert not (root / "data" / "prepared").exists()
    assert yaml.safe_load((root / "params.yaml").read_text())["teacher"]["epochs"] == -1
