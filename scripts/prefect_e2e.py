"""End to end on a real Prefect server: the `nightly` deployment of prefect.yaml, on a tiny project.

In a temporary directory: the tiny project of scripts/tiny_project.py as a git + DVC repository, then, through
the Makefile's own targets, a Prefect server on 127.0.0.1 with a temporary PREFECT_HOME, the process work
pool, `prefect deploy`, a worker. Then `prefect deployment run 'compress-family/nightly'`, which must end
COMPLETED with every stage of dvc.yaml in dvc.lock; the same with a gate that cannot pass
(verify_teacher.min_macro_f1=1.0), which must end FAILED with the gate's message; and the cron schedule,
which must have created SCHEDULED runs at 02:00 UTC. Every process started here is stopped at the end.

    python scripts/prefect_e2e.py [--keep]     (or: make prefect-e2e; takes a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.tiny_project import (  # noqa: E402
    init_repo,
    make_tiny_bert,
    read_tiny_texts,
    tiny_params_tree,
    write_project,
)

DEPLOYMENT = "compress-family/nightly"
RUN_TIMEOUT = 1800  # seconds for one flow run of the whole tiny DAG on a slow machine


def say(message: str) -> None:
    print(f"[e2e] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """The background processes of this run, each in its own process group, stopped in reverse order."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
        handle = open(log, "w")
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))
        return process

    def stop(self) -> None:
        for name, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # the group: make, prefect and their children
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            say(f"stopped {name}")


def wait_for_api(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the Prefect server exited ({server.returncode}); its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"no Prefect API at {url} after {timeout:.0f} s; server log:\n{log.read_text()[-3000:]}")


def run_deployment(project: Path, env: dict[str, str], parameters: dict[str, Any] | None = None) -> str:
    """`prefect deployment run`, as a user would type it; returns the new flow run's id."""
    args = [str(Path(sys.executable).parent / "prefect"), "deployment", "run", DEPLOYMENT]
    if parameters:
        args += ["--params", json.dumps(parameters)]
    result = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"prefect deployment run failed:\n{result.stdout}\n{result.stderr}")
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    if not match:
        raise SystemExit(f"no flow run id in the output of prefect deployment run:\n{result.stdout}")
    return match.group(1)


def wait_for_final_state(client: Any, flow_run_id: str, worker: subprocess.Popen, worker_log: Path) -> Any:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state and flow_run.state.is_final():
            return flow_run
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited ({worker.returncode}); its log:\n{worker_log.read_text()[-3000:]}")
        time.sleep(5)
    raise SystemExit(f"flow run {flow_run_id} did not finish within {RUN_TIMEOUT} s; worker log: {worker_log}")


def mlflow_stages(tracking_uri: str, pipeline_run: str) -> list[str]:
    """The stage tag of every MLflow run grouped under one flow run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("fincompress")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.pipeline_run = '{pipeline_run}'")
    return [run.data.tags["stage"] for run in runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, project)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="fincompress-e2e-"))
    project = write_project(base / "project", tiny_params_tree(make_tiny_bert(base / "tiny_bert", read_tiny_texts())))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    init_repo(project)
    say(f"tiny project: {project}")

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(base / "prefect-home"),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",  # never the caller's database
        HF_HUB_OFFLINE="1",
        # A 32-wide model: torch's thread pool costs more than it saves (30x on a busy 2-core machine).
        OMP_NUM_THREADS="1",
    )
    # The Makefile's targets, run in the tiny project with this interpreter's environment (-o: no setup).
    make = ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", ".venv/.installed",
            f"BIN={Path(sys.executable).parent}", f"PREFECT_PORT={port}"]

    stack = Stack()
    try:
        server_log, worker_log = base / "server.log", base / "worker.log"
        server = stack.start("prefect server", [*make, "prefect-server"], project, env, server_log)
        wait_for_api(api_url, server, server_log)
        say(f"server up at {api_url} (PREFECT_HOME={env['PREFECT_HOME']})")

        deployed = subprocess.run([*make, "prefect-deploy"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        if deployed.returncode != 0:
            raise SystemExit(f"make prefect-deploy failed:\n{deployed.stdout[-3000:]}\n{deployed.stderr[-3000:]}")
        say(f"make prefect-deploy: {DEPLOYMENT} on the process pool fincompress-pool")
        worker = stack.start("prefect worker", [*make, "prefect-worker"], project, env, worker_log)

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            DeploymentFilter,
            FlowRunFilter,
        )
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
            start = time.monotonic()
            flow_run = wait_for_final_state(client, run_deployment(project, env), worker, worker_log)
            say(f"run 1 `prefect deployment run '{DEPLOYMENT}'`: {flow_run.state.type.value} "
                f"in {time.monotonic() - start:.0f} s (flow run {flow_run.id})")
            if not flow_run.state.is_completed():
                raise SystemExit(f"expected COMPLETED: {flow_run.state.message}; worker log: {worker_log}")
            locked = list(yaml.safe_load((project / "dvc.lock").read_text())["stages"])
            missing = set(stages) - set(locked)
            if missing:
                raise SystemExit(f"stages missing from dvc.lock after a COMPLETED run: {missing}")
            say(f"  dvc.lock has every stage of dvc.yaml: {', '.join(stages)}")
            tracked = mlflow_stages(env["MLFLOW_TRACKING_URI"], str(flow_run.id))
            say(f"  MLflow runs tagged pipeline_run={flow_run.id}: {len(tracked)} ({', '.join(sorted(set(tracked)))})")
            if not set(stages) <= set(tracked):
                raise SystemExit(f"stages without an MLflow run in this flow run: {set(stages) - set(tracked)}")
            if (project / "reports" / "comparison.md").is_file():
                artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["fincompress-comparison"]), flow_run_id={"any_": [flow_run.id]}))
                if not artifacts:
                    raise SystemExit("reports/comparison.md exists but was not published as an artifact")
                say(f"  markdown artifact fincompress-comparison: {len(artifacts[0].data)} characters of comparison.md")

            flow_run = wait_for_final_state(
                client, run_deployment(project, env, {"overrides": ["verify_teacher.min_macro_f1=1.0"]}), worker, worker_log
            )
            say(f"run 2 with overrides=['verify_teacher.min_macro_f1=1.0']: {flow_run.state.type.value}")
            say(f"  {flow_run.state.message}")
            if not flow_run.state.is_failed() or "teacher gate failed" not in (flow_run.state.message or ""):
                raise SystemExit(f"expected FAILED with the gate's message; worker log: {worker_log}")

            deployment = client.read_deployment_by_name(DEPLOYMENT)
            say(f"  schedules: {[(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules]}")
            deadline = time.monotonic() + 180  # the scheduler service runs once a minute
            while True:
                scheduled = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
                    flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}}),
                    sort="EXPECTED_START_TIME_ASC",
                )
                if scheduled or time.monotonic() > deadline:
                    break
                time.sleep(5)
            times = [run.expected_start_time.astimezone(timezone.utc) for run in scheduled]
            say(f"  SCHEDULED runs created by the cron schedule: {len(times)}; next: "
                + ", ".join(t.isoformat() for t in times[:3]))
            if not times or any((t.hour, t.minute, t.second) != (2, 0, 0) for t in times):
                raise SystemExit(f"expected SCHEDULED runs at 02:00 UTC, got {times}")
        say("OK: COMPLETED, FAILED at the gate, SCHEDULED at 02:00 UTC")
        return 0
    finally:
        stack.stop()
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
