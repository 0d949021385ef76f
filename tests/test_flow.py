"""The Prefect flow (pipeline/orchestration/flow.py) under prefect_test_harness: its tasks are DVC's stages, DVC's
cache decides what runs, a failed gate fails the run with its message and is never retried, transient
failures are retried, overrides apply for one run only, independent stages fan out on a Dask cluster.

The real stages run on the tiny config with dvc.yaml cut to prepare_data -> train_teacher ->
verify_teacher (the full DAG runs in scripts/prefect_e2e.py); retries, fan-out and the report artifact
run on toy DVC pipelines whose stages take milliseconds (or sleep, to show they overlap).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.orchestration.flow import compress_family, stage_graph
from scripts.tiny_project import init_repo, tiny_params_tree, write_project
from tests.helpers import mlflow_runs


def keep_stages(root: Path, names: list[str]) -> None:
    """Cut the project's dvc.yaml down to `names` (which must be closed under their dependencies)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    missing = set(names) - set(stages)
    assert not missing, f"dvc.yaml has no stages {missing}"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {n: stages[n] for n in names}}, sort_keys=False))


# A toy stage: records when and where it ran, then succeeds, fails once (a transient crash),
# or rejects its input the way a FinCompress gate does.
TOY_STAGE = '''
import json, os, sys, time
from pathlib import Path
import psutil
name, behaviour = sys.argv[1], sys.argv[2]
counter = Path(".attempts") / name
counter.parent.mkdir(exist_ok=True)
attempt = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(attempt))
start = time.time()
if behaviour == "reject":
    print(f"error: {name}: gate failed: the toy metric 0.1 is below the threshold 0.9\\n  per class: a=0.1", file=sys.stderr)
    sys.exit(1)
if behaviour == "flaky" and attempt == 1:
    print("Killed (simulated out-of-memory)", file=sys.stderr)
    sys.exit(137)
if behaviour == "slow":
    time.sleep(3)
if behaviour == "report":
    Path("reports").mkdir(exist_ok=True)
    Path("reports/comparison.md").write_text("| member | macro-F1 |\\n|---|---|\\n| toy | 1.0 |\\n")
Path("out").mkdir(exist_ok=True)
Path(f"out/{name}.json").write_text(json.dumps({
    "start": start, "end": time.time(), "attempt": attempt,
    "pipeline_run": os.environ.get("FINCOMPRESS_PIPELINE_RUN"),
    "mlflow_uri": os.environ.get("MLFLOW_TRACKING_URI"),
    # stage <- (shell) <- dvc <- whoever ran dvc: the flow's process or a Dask worker
    "ancestors": [process.pid for process in psutil.Process().parents()],
}))
'''


def toy_project(root: Path, tiny_bert: Path, stages: dict[str, tuple[str, list[str]]]) -> Path:
    """A DVC project whose stages are `name: (behaviour, upstream names)`, with the tiny params.yaml."""
    write_project(root, tiny_params_tree(tiny_bert))
    (root / "toy_stage.py").write_text(TOY_STAGE)
    dvc_yaml = {
        name: {
            "cmd": f"python toy_stage.py {name} {behaviour}",
            "deps": ["toy_stage.py"] + [f"out/{up}.json" for up in upstream],
            "outs": [f"out/{name}.json"] + (["reports/comparison.md"] if behaviour == "report" else []),
        }
        for name, (behaviour, upstream) in stages.items()
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": dvc_yaml}, sort_keys=False))
    (root / ".gitignore").write_text(".attempts/\n")
    return init_repo(root)


def toy_record(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / "out" / f"{name}.json").read_text())


def attempts(root: Path, name: str) -> int:
    counter = root / ".attempts" / name
    return int(counter.read_text()) if counter.exists() else 0


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API and database for the flow runs of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_flow(**parameters: Any):
    """Run compress-family and return its final state (not raising on failure)."""
    return compress_family(**parameters, return_state=True)


def stage_task_runs(flow_run_id) -> dict[str, Any]:
    """The stage task runs of one compress-family run (they live in its compress-family-stages subflow)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        assert len(children) == 1, children
        return {run.name: run for run in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [children[0].id]}))}


def run_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are shipped in batches; make sure this run's are in
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id] + [child.id for child in children]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": ids}))
    return "\n".join(log.message for log in logs)


# ----------------------------------------------------------------------------------------------------
# The DAG comes from DVC


def test_stage_graph_is_dvc_dag(tmp_path, tiny_bert):
    """The project's own dvc.yaml, read through DVC: every stage, each after the stages it needs."""
    from dvc.repo import Repo

    root = write_project(tmp_path / "project", tiny_params_tree(tiny_bert))
    Repo.init(str(root), no_scm=True).close()
    dag = stage_graph(root)
    declared = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert set(dag) == set(declared)
    order = list(dag)
    for stage, upstream in dag.items():
        assert all(order.index(up) < order.index(stage) for up in upstream), (stage, upstream)
    assert dag["prepare_data"] == []
    assert "prepare_data" in dag["train_teacher"]
    assert "train_teacher" in dag["verify_teacher"]
    # The students read verify_teacher's metrics file: the gate comes before every student.
    for student in ("student_baseline", "distill_vanilla", "distill_intermediate"):
        assert "verify_teacher" in dag[student], dag[student]


def test_stage_graph_of_a_toy_pipeline_is_exact(tmp_path, tiny_bert):
    root = toy_project(tmp_path / "toy", tiny_bert, {
        "source": ("ok", []), "left": ("ok", ["source"]), "right": ("ok", ["source"]),
        "join": ("ok", ["left", "right"]),
    })
    assert stage_graph(root) == {"source": [], "left": ["source"], "right": ["source"], "join": ["left", "right"]}


def test_not_a_dvc_project_says_how_to_fix(tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="not a DVC project"):
        stage_graph(tmp_path)


# ----------------------------------------------------------------------------------------------------
# The real stages on the tiny config


@pytest.fixture(scope="module")
def ml_project(tmp_path_factory, tiny_bert, prefect_api):
    """The tiny project, first three stages, built by one flow run and then run again unchanged."""
    tree = tiny_params_tree(tiny_bert)
    tree["teacher"]["epochs"] = 8  # the fewest at which the tiny teacher passes the gate (not one class)
    root = write_project(tmp_path_factory.mktemp("flow") / "project", tree)
    keep_stages(root, ["prepare_data", "train_teacher", "verify_teacher"])
    init_repo(root)
    first = run_flow(project_dir=str(root))
    second = run_flow(project_dir=str(root))
    return root, first, second


@pytest.mark.slow
def test_flow_runs_every_stage_through_dvc(ml_project):
    root, first, _ = ml_project
    assert first.is_completed(), first.message
    assert first.result() == {"prepare_data": "ran", "train_teacher": "ran", "verify_teacher": "ran"}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prepare_data", "train_teacher", "verify_teacher"}, "DVC recorded every stage"
    assert (root / "models" / "teacher" / "model.safetensors").is_file()
    # One MLflow run per stage, grouped under this Prefect flow run.
    flow_run_id = str(first.state_details.flow_run_id)
    assert sorted(run.data.tags["stage"] for run in mlflow_runs(flow_run_id)) == sorted(lock)
    # The stages' own output reached the Prefect run logs, line by line.
    logs = run_logs(first.state_details.flow_run_id)
    assert "Running stage 'train_teacher'" in logs
    assert "> python -m stages.verify_teacher" in logs


@pytest.mark.slow
def test_second_flow_run_skips_unchanged_stages(ml_project):
    root, _, second = ml_project
    assert second.is_completed(), second.message
    assert set(second.result().values()) == {"skipped"}
    assert mlflow_runs(str(second.state_details.flow_run_id)) == [], "no stage ran, so no MLflow run"


@pytest.mark.slow
def test_failed_gate_fails_the_flow_with_its_message_and_is_not_retried(ml_project):
    root, _, _ = ml_project
    params_before = (root / "params.yaml").read_bytes()
    state = run_flow(project_dir=str(root), overrides=[
        "verify_teacher.min_macro_f1=1.0",  # the gate: no tiny teacher reaches this
        "flow.retries=2", "flow.retry_delay_seconds=0",  # retries are allowed, but not for a gate
    ])
    assert state.is_failed()
    assert "error: verify_teacher: teacher gate failed: validation macro-F1" in state.message
    assert "below the threshold 1.0" in state.message
    runs = stage_task_runs(state.state_details.flow_run_id)
    assert runs["verify_teacher"].state.is_failed()
    assert runs["verify_teacher"].run_count == 1, "a failed gate is deterministic: never retried"
    # Only the stage whose params changed ran (DVC kept the data and the teacher); its MLflow run failed.
    ran = mlflow_runs(str(state.state_details.flow_run_id))
    assert [(run.data.tags["stage"], run.info.status) for run in ran] == [("verify_teacher", "FAILED")]
    # The overrides were for that run only.
    assert (root / "params.yaml").read_bytes() == params_before


@pytest.mark.slow
def test_invalid_override_fails_before_any_stage_runs(ml_project):
    root, _, _ = ml_project
    params_before = (root / "params.yaml").read_bytes()
    state = run_flow(project_dir=str(root), overrides=["teacher.epochz=3"])
    assert state.is_failed()
    assert "teacher.epochz" in state.message and "exists in params.yaml" in state.message
    state = run_flow(project_dir=str(root), overrides=["verify_teacher.min_macro_f1=2"])
    assert state.is_failed()
    assert "verify_teacher.min_macro_f1" in state.message and "less than or equal to 1" in state.message
    assert (root / "params.yaml").read_bytes() == params_before


# ----------------------------------------------------------------------------------------------------
# Retries, environment, parallel fan-out and artifacts on toy pipelines


@pytest.mark.slow
def test_transient_failures_are_retried_and_rejections_are_not(tmp_path, tiny_bert, prefect_api, monkeypatch):
    root = toy_project(tmp_path / "toy", tiny_bert, {
        "source": ("ok", []),
        "flaky": ("flaky", ["source"]),  # crashes once, then succeeds
        "gate": ("reject", ["source"]), "after": ("ok", ["gate"]),  # a gate that fails, and what it guards
    })
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the flow then points the stages at <project>/mlflow.db
    state = run_flow(project_dir=str(root), overrides=["flow.retries=2", "flow.retry_delay_seconds=0"])
    assert state.is_failed()
    assert "error: gate: gate failed: the toy metric 0.1 is below the threshold 0.9\n  per class: a=0.1" in state.message
    runs = stage_task_runs(state.state_details.flow_run_id)
    assert runs["flaky"].state.is_completed() and runs["flaky"].run_count == 2 == attempts(root, "flaky")
    assert runs["gate"].run_count == 1 == attempts(root, "gate"), "a rejection is deterministic: never retried"
    assert runs["after"].state.name == "NotReady" and attempts(root, "after") == 0
    record = toy_record(root, "flaky")
    assert record["pipeline_run"] == str(state.state_details.flow_run_id)
    assert record["mlflow_uri"] == f"sqlite:///{root.resolve() / 'mlflow.db'}"


@pytest.mark.slow
def test_independent_stages_fan_out_on_a_dask_cluster_and_the_report_is_published(tmp_path, tiny_bert, prefect_api):
    """prefect-dask: the three students of a toy DAG run at once on a LocalCluster of two workers."""
    from distributed import Client, LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    students = ["student_a", "student_b", "student_c"]
    root = toy_project(tmp_path / "toy", tiny_bert, {
        "source": ("ok", []),
        **{name: ("slow", ["source"]) for name in students},  # 3 s each, independent of one another
        "report": ("report", students),  # writes reports/comparison.md
    })
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        workers = set(client.run(os.getpid).values())
        state = run_flow(project_dir=str(root), dask_address=cluster.scheduler_address)
    assert state.is_completed(), state.message
    records = {name: toy_record(root, name) for name in students}
    ran_on = {pid for record in records.values() for pid in record["ancestors"] if pid in workers}
    assert ran_on == workers, "the students ran inside both Dask workers"
    spans = sorted((record["start"], record["end"]) for record in records.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two students overlapped: {spans}"
    assert toy_record(root, "report")["start"] >= max(end for _, end in spans), "report waited for every student"
    with get_client(sync_client=True) as api:
        artifacts = api.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fincompress-comparison"]))
        )
    assert [artifact.flow_run_id for artifact in artifacts] == [state.state_details.flow_run_id]
    assert "| toy | 1.0 |" in artifacts[0].data
