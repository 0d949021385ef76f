"""The whole DAG through `dvc repro` in a temporary git repository, on the tiny config."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from scripts.tiny_project import dvc, init_repo, tiny_params_tree, write_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory, tiny_bert):
    root = write_project(tmp_path_factory.mktemp("dvc") / "project", tiny_params_tree(tiny_bert))
    init_repo(root)
    first = dvc(root, "repro")
    return root, first


def test_repro_builds_every_stage(repro_project):
    root, first = repro_project
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages), "every stage ran and was locked"
    for name in stages:
        assert (root / "reports" / "metrics" / f"{name}.json").is_file(), name
    assert (root / "models" / "teacher" / "model.safetensors").is_file()


def test_second_repro_is_a_no_op(repro_project):
    root, _ = repro_project
    second = dvc(root, "repro")
    assert "Running stage" not in second.stdout, second.stdout
    status = dvc(root, "status")
    assert "up to date" in status.stdout


def stages_changed_by_a_line(root, module: str) -> set[str]:
    """The stages `dvc status` lists after a one-line change to `module` (restored afterwards)."""
    path = root / module
    original = path.read_text()
    try:
        path.write_text(original + "# a one-line change\n")
        return set(json.loads(dvc(root, "status", "--json").stdout))
    finally:
        path.write_text(original)


def test_a_change_to_student_kd_code_invalidates_the_students_not_the_teacher(repro_project):
    """Issue 26: a one-line change in the student-only KD terms makes `dvc status` list the students
    and what reads their code downstream, never the teacher's stages (no 14-60 minute re-train)."""
    root, _ = repro_project
    changed = stages_changed_by_a_line(root, "pipeline/kd/terms.py")
    assert {"teacher_logits", "student_baseline", "distill_vanilla", "distill_intermediate", "prune"} <= changed
    assert not changed & {"prepare_data", "train_teacher", "verify_teacher"}, changed
    assert not changed & {"baseline_tfidf", "baseline_static"}, "the reference members do not read student code"
    assert "up to date" in dvc(root, "status").stdout


def test_a_change_to_a_reference_members_training_code_rebuilds_that_member_only(repro_project):
    """Issue 31: tfidf's training code re-runs its stage alone (the benchmark reads its model, whose
    inference code is pipeline/baselines/classifiers.py), and no student or teacher stage."""
    root, _ = repro_project
    changed = stages_changed_by_a_line(root, "pipeline/baselines/tfidf.py")
    assert changed == {"baseline_tfidf"}, changed


def test_exp_run_with_a_changed_param(repro_project):
    root, _ = repro_project
    # An SLA knob: only the report stage re-runs in the experiment (the rest comes from the cache).
    result = dvc(root, "exp", "run", "-S", "report.sla.max_latency_ms=0.001", "--name", "strict-sla")
    assert "Running stage 'report'" in result.stdout and "Running stage 'benchmark'" not in result.stdout
    shown = dvc(root, "exp", "show", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(shown)))
    assert any(row["Experiment"] == "strict-sla" and row["report.sla.max_latency_ms"] == "0.001" for row in rows)


def test_gate_failure_stops_the_dag(tmp_path, tiny_bert):
    tree = tiny_params_tree(tiny_bert)
    tree["verify_teacher"]["min_macro_f1"] = 1.0
    root = write_project(tmp_path / "project", tree)
    init_repo(root)
    result = dvc(root, "repro", check=False)
    assert result.returncode != 0
    assert "teacher gate failed" in result.stderr + result.stdout
    assert (root / "models" / "teacher").is_dir()
    assert not (root / "models" / "student_baseline").exists()
