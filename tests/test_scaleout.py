"""The paths beyond one machine, each exercised on this one: data-parallel teacher training under
torchrun (DDP over gloo on the CPU), the tracking server of `make mlflow-server`, and a DVC remote
(push, lose the cache, pull). Stages fanned out on a Dask cluster (prefect-dask) are tested in
tests/test_flow.py, which owns the session's Prefect test server."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from scripts.tiny_project import REPO, dvc, init_repo, sh, tiny_params_tree, write_project
from tests.helpers import mlflow_runs

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(pid: int) -> set[str]:
    """The local addresses a process and its children listen on."""
    import psutil

    root = psutil.Process(pid)
    addresses = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            addresses |= {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return addresses


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory, tiny_bert) -> Path:
    """The tiny project as a git + DVC repository after `dvc repro prepare_data` (the cheap stage)."""
    root = write_project(tmp_path_factory.mktemp("scaleout") / "project", tiny_params_tree(tiny_bert))
    init_repo(root)
    dvc(root, "repro", "prepare_data")
    return root


def test_train_teacher_is_data_parallel_under_torchrun(prepared_repo):
    root = prepared_repo
    run_id = f"torchrun-{uuid.uuid4().hex[:8]}"
    epochs = 2
    # --standalone: a local rendezvous on a free port; GLOO_SOCKET_IFNAME=lo keeps gloo on the loopback.
    sh([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "stages.train_teacher",
        f"teacher.epochs={epochs}"], root, env={"GLOO_SOCKET_IFNAME": "lo", "FINCOMPRESS_PIPELINE_RUN": run_id})
    assert (root / "models" / "teacher" / "model.safetensors").is_file()
    # Each rank saw half of every batch: the optimizer took half the steps one process would take.
    train_rows = json.loads((root / "reports" / "metrics" / "prepare_data.json").read_text())["train_rows"]
    batch = yaml.safe_load((root / "params.yaml").read_text())["teacher"]["batch_size"]  # per rank
    curve = (root / "reports" / "curves" / "train_teacher.csv").read_text().splitlines()
    last_step = int(curve[-1].split(",")[0])
    assert last_step == epochs * math.ceil(train_rows / (batch * 2)), (last_step, train_rows, curve)
    # Only rank 0 tracked.
    assert [run.data.tags["stage"] for run in mlflow_runs(run_id)] == ["train_teacher"]


def test_mlflow_server_target_keeps_runs_in_the_database_and_artifacts_in_the_store(tmp_path):
    import mlflow

    port = free_port()
    database, store = tmp_path / "server.db", tmp_path / "artifacts"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed", f"BIN={VENV_BIN}", "mlflow-server",
         f"MLFLOW_PORT={port}", f"MLFLOW_BACKEND_URI=sqlite:///{database}", f"MLFLOW_ARTIFACTS={store}", "MLFLOW_WORKERS=1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        assert listening_addresses(server.pid) == {"127.0.0.1"}
        client = mlflow.MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("scaleout"))
        (tmp_path / "verify_teacher.json").write_text('{"passed": true}')
        client.log_metric(run.info.run_id, "validation_macro_f1", 0.9)
        client.log_artifact(run.info.run_id, str(tmp_path / "verify_teacher.json"), "metrics")
        client.set_terminated(run.info.run_id)
        # Uploaded through the server into its store, not written by the client next to itself.
        assert [p.read_text() for p in store.rglob("verify_teacher.json")] == ['{"passed": true}']
        stored = mlflow.MlflowClient(tracking_uri=f"sqlite:///{database}").get_run(run.info.run_id)
        assert stored.data.metrics == {"validation_macro_f1": 0.9}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def test_dvc_remote_push_then_pull_restores_the_artifacts(prepared_repo, tmp_path):
    root = prepared_repo
    prepared = root / "data" / "prepared"
    before = {path.relative_to(prepared): path.read_bytes() for path in prepared.rglob("*") if path.is_file()}
    assert before, "prepare_data wrote nothing"
    dvc(root, "remote", "add", "--default", "storage", str(tmp_path / "remote"))
    dvc(root, "push", "prepare_data")
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(prepared)
    assert "not in cache:       data/prepared" in dvc(root, "status", "prepare_data").stdout
    dvc(root, "pull", "prepare_data")
    after = {path.relative_to(prepared): path.read_bytes() for path in prepared.rglob("*") if path.is_file()}
    assert after == before
    assert "up to date" in dvc(root, "status", "prepare_data").stdout
