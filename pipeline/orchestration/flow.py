"""The Prefect flow `compress-family`: the DVC DAG of dvc.yaml, one Prefect task per stage.

The tasks come from DVC's own stage graph (`Repo.index.graph`), never restated here, and each runs
`dvc repro --single-item <stage>` in the project: DVC decides what is skipped and versions every
artifact, so a flow run and a `dvc repro` can never disagree. Prefect adds scheduling, retries of
transient failures, parallel or distributed execution, logs and artifacts in its UI.

Run it once:            python -m pipeline.orchestration.flow [key=value ...]
On a schedule:          prefect.yaml (deployment `nightly`), see the Makefile's prefect-* targets.
On a Dask cluster:      compress_family(dask_address="tcp://scheduler:8786") (workers need the
                        project at the same path, e.g. on a shared filesystem).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config import Params, load_params
from pipeline.errors import ConfigError
from pipeline.tracking import PIPELINE_RUN_ENV

REPO = Path(__file__).resolve().parents[2]
# Written by the report stage; published as a Prefect artifact when present after a run.
COMPARISON_REPORT = "comparison.md"


class StageFailed(RuntimeError):
    """A stage exited nonzero for a reason that may be transient (killed, out of memory, a crash)."""


class StageRejected(StageFailed):
    """The stage reported a user-facing error (`error: <stage>: ...`): a failed gate or parity check,
    invalid params. Running it again gives the same answer, so it is never retried."""


def retry_unless_rejected(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient failures, never a stage that rejected its inputs."""
    return not isinstance(state.result(raise_on_failure=False), StageRejected)


def _address(stage: Any) -> str:
    """The stage's name for `dvc repro` run in the project root (DVC's own `addressing` is relative
    to this process's working directory, which need not be the project)."""
    from dvc.stage import PipelineStage

    if not isinstance(stage, PipelineStage):  # a single-stage .dvc file
        return stage.path_in_repo
    return stage.name if stage.path_in_repo == "dvc.yaml" else f"{stage.path_in_repo}:{stage.name}"


def stage_graph(project_dir: Path) -> dict[str, list[str]]:
    """DVC's pipeline: every stage in an order DVC could run them, with the stages it directly needs.

    Keys are DVC stage addresses (what `dvc repro` accepts); `dvc add`-ed data files are not stages
    to run and are left out.
    """
    import networkx as nx
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(project_dir))
    except NotDvcRepoError:
        raise ConfigError(
            f"{project_dir} is not a DVC project (no .dvc directory); pass the project root as "
            "project_dir, or run `git init && dvc init` there first"
        ) from None
    with repo:
        graph = repo.index.graph  # an edge (a, b) means stage a depends on an output of stage b
        position = {_address(stage): i for i, stage in enumerate(repo.index.stages)}
        # Stages that depend on nothing come first; ties keep dvc.yaml's order, so logs read naturally.
        ordered = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda s: position[_address(s)])
        return {
            _address(stage): [_address(dep) for dep in graph.successors(stage) if not dep.is_data_source]
            for stage in ordered
            if not stage.is_data_source
        }


@contextlib.contextmanager
def applied_overrides(params_file: Path, overrides: list[str]) -> Iterator[None]:
    """params.yaml with `key=value` overrides for the duration of a run, then exactly as it was.

    The overrides are written into params.yaml by DVC's own `dvc exp run -S` code (comments kept,
    unknown keys rejected), so DVC sees them as params changes: the stages that read a changed key
    re-run and dvc.lock records the values they ran with. Afterwards the file is restored, so a
    one-off override never leaks into the next scheduled run (which then re-runs those stages).
    """
    if not overrides:
        yield
        return
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    original = params_file.read_bytes()
    try:
        try:
            apply_overrides(str(params_file), list(overrides))
        except InvalidArgumentError as error:
            reason = str(error.__cause__ or error).splitlines()[0]  # not Hydra's `+key` hint: keys are fixed
            raise ConfigError(
                f"overrides {overrides}: {reason} Give section.key=value with a key that exists in "
                f"{params_file.name}, e.g. teacher.epochs=1"
            ) from None
        yield
    finally:
        params_file.write_bytes(original)


def stage_environment(extra: dict[str, str]) -> dict[str, str]:
    """The environment a stage runs in, on whichever machine runs the task."""
    env = {**os.environ, **extra}
    # dvc.yaml says `python -m stages.<name>`: run it with this interpreter, not whatever is on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are printed, not when the stage ends
    # Progress bars as one log line every 10 s rather than ten a second.
    env.setdefault("TQDM_MININTERVAL", "10")
    return env


@task(task_run_name="{stage}", retry_condition_fn=retry_unless_rejected, cache_policy=NO_CACHE)
def run_stage(stage: str, project_dir: str, env: dict[str, str]) -> str:
    """`dvc repro --single-item <stage>`, its output streamed line by line into the task run's log.

    Returns "ran" or "skipped" (DVC found the stage's deps, params and outputs unchanged).
    """
    logger = get_run_logger()
    name = stage.rsplit(":", 1)[-1]  # `dir/dvc.yaml:name` -> name, as the stage reports its errors
    # --wait-for-lock: DVC releases its repo lock while a stage's command runs, so independent stages
    # run at once and only queue for DVC's short bookkeeping before and after.
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    ran, rejection = False, []
    with subprocess.Popen(
        command, cwd=project_dir, env=stage_environment(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            if not line:
                continue
            logger.info(line)
            ran = ran or line.startswith(f"Running stage '{stage}'")
            if line.startswith(f"error: {name}:"):
                rejection = [line]
            elif rejection and not line.startswith("ERROR:"):  # until DVC's own "failed to reproduce"
                rejection.append(line)  # the rest of a multi-line message (invalid params list keys)
    if process.returncode != 0:
        if rejection:
            raise StageRejected("\n".join(rejection))
        raise StageFailed(
            f"`dvc repro --single-item {stage}` exited with status {process.returncode} in {project_dir}; "
            "the task's log has its output"
        )
    return "ran" if ran else "skipped"


@flow(name="compress-family-stages")
def run_stages(
    dag: dict[str, list[str]], project_dir: str, env: dict[str, str], retries: int, retry_delay_seconds: float
) -> dict[str, str]:
    """Submit every stage once its upstream stages are done; independent stages run in parallel as
    far as the flow's task runner allows."""
    stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    futures = {}
    for stage, upstream in dag.items():  # in DAG order: every upstream future exists already
        futures[stage] = stage_task.submit(stage, project_dir, env, wait_for=[futures[u] for u in upstream])
    # Let running stages finish before failing the run (leaving DVC and params.yaml in a clean state);
    # results in DAG order raise the first failure, the one every skipped stage waited for.
    wait(list(futures.values()))
    return {stage: future.result() for stage, future in futures.items()}


def publish_report(params: Params) -> str | None:
    """The report stage's comparison table as a Prefect markdown artifact, when the run produced one."""
    report = params.path(params.paths.reports) / COMPARISON_REPORT
    if not report.is_file():
        return None
    create_markdown_artifact(
        key="fincompress-comparison",
        markdown=report.read_text(encoding="utf-8"),
        description=f"{report} after flow run {flow_run.id}",
    )
    return str(report)


@flow(name="compress-family")
def compress_family(
    project_dir: str = str(REPO),
    overrides: list[str] | None = None,
    max_parallel: int = 1,
    dask_address: str | None = None,
) -> dict[str, str]:
    """Build the model family: every DVC stage of `project_dir`, in DAG order, through `dvc repro`.

    Args:
        project_dir: the project root (its dvc.yaml and params.yaml).
        overrides: params overrides for this run only, `section.key=value` (as `dvc exp run -S`).
        max_parallel: how many independent stages may run at once on this machine (e.g. 3 for the
            three students); 1 runs them one after another.
        dask_address: a Dask scheduler (`tcp://host:8786`) to run the stages on instead; its workers
            need this project at the same path (a shared filesystem) and the same environment.

    Returns each stage's outcome: "ran" or "skipped" (unchanged, DVC kept its outputs).
    """
    if max_parallel < 1:
        raise ConfigError(f"max_parallel must be at least 1, got {max_parallel}")
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    params_file = root / "params.yaml"
    if not params_file.is_file():
        raise ConfigError(f"{params_file} not found; pass the project root as project_dir")
    # Groups the MLflow runs of every stage of this flow run (pipeline/tracking.py).
    env = {PIPELINE_RUN_ENV: str(flow_run.id)}
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # absolute: stages run in other directories too
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    with applied_overrides(params_file, overrides or []):
        params = load_params(params_file)  # invalid overrides fail here, before any stage runs
        dag = stage_graph(root)
        logger.info("DVC stages in %s: %s", root, " -> ".join(dag))
        if dask_address:
            from prefect_dask import DaskTaskRunner  # imports dask.distributed: only when asked for

            runner = DaskTaskRunner(address=dask_address)
        else:
            runner = ThreadPoolTaskRunner(max_workers=max_parallel)
        outcome = run_stages.with_options(task_runner=runner)(
            dag, str(root), env, params.flow.retries, params.flow.retry_delay_seconds
        )
        published = publish_report(params)
    ran = [stage for stage, status in outcome.items() if status == "ran"]
    logger.info("ran: %s; unchanged: %s", ", ".join(ran) or "none",
                ", ".join(stage for stage in outcome if stage not in ran) or "none")
    if published:
        logger.info("published %s as the artifact fincompress-comparison", published)
    return outcome


if __name__ == "__main__":
    compress_family(overrides=sys.argv[1:])
