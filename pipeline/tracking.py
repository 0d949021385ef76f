"""MLflow: one run per stage execution, tagged so the runs of one pipeline execution are found together.

Tracking URI: `MLFLOW_TRACKING_URI` when set, otherwise an absolute `sqlite:///<project>/mlflow.db`
(absolute because DVC, DVC experiment queues and Prefect run stages from different directories).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.errors import TransientError
from pipeline.io import pid_alive as _pid_alive

log = logging.getLogger(__name__)

PIPELINE_RUN_ENV = "FINCOMPRESS_PIPELINE_RUN"
# host:pid of the process running a stage run, so a run left RUNNING by a killed process can be closed.
OWNER_TAG = "owner"


def project_root(params: Params) -> Path:
    """The project directory, also from inside a DVC experiment's temporary workspace."""
    root = params.root.resolve()
    parts = root.parts
    if ".dvc" in parts:  # dvc exp run --queue works in <project>/.dvc/tmp/exps/...
        root = Path(*parts[: parts.index(".dvc")])
    return root


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(params) / 'mlflow.db'}"


def _git(args: list[str], cwd: Path) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit(cwd: Path) -> str:
    commit = _git(["rev-parse", "HEAD"], cwd) or "unknown"
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return f"{commit}-dirty" if dirty and commit != "unknown" else commit


def pipeline_run_id(params: Params, commit: str) -> str:
    """Groups the stage runs of one pipeline execution.

    The orchestrators (`make run`, the Prefect flow) set FINCOMPRESS_PIPELINE_RUN; a bare `dvc repro`
    falls back to the project, its params file and commit: the identity of a family version.
    """
    explicit = os.environ.get(PIPELINE_RUN_ENV)
    if explicit:
        return explicit
    params_file = params.root / "params.yaml"
    content = params_file.read_bytes() if params_file.is_file() else b""
    digest = hashlib.sha256(str(project_root(params)).encode() + content).hexdigest()[:10]
    return f"params-{digest}@{commit[:10]}"


def check_tracking_server(uri: str) -> None:
    """Fail before any work when the tracking server cannot be reached."""
    import mlflow

    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:
        raise TransientError(
            f"MLflow tracking server {uri} is unreachable ({type(error).__name__}: {str(error)[:200]}); "
            "start it (make mlflow-server) or unset MLFLOW_TRACKING_URI to use the local sqlite database"
        ) from None


def _experiment_id(name: str, root: Path, uri: str) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local database keeps artifacts beside it (absolute, for the same reason as the URI); a
    # tracking server decides where artifacts go (its artifact store).
    local = not uri.startswith(("http://", "https://"))
    location = (root / "mlartifacts").resolve().as_uri() if local else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:
        existing = mlflow.get_experiment_by_name(name)  # created concurrently by another stage
        if existing is None:  # not that: the store cannot be written (read-only, full)
            raise
        return existing.experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def stage_run(
    params: Params, stage: str, member: str | None, sections: tuple[str, ...], data_hash: str | None,
    reference: bool = False,
) -> Iterator[Any]:
    """Open the stage's MLflow run; an exception inside marks it FAILED and propagates. A reference
    member's run (pipeline/baselines/) is tagged reference=true, the family's reference=false."""
    import mlflow

    uri = tracking_uri(params)
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    root = project_root(params)
    with writing(uri, f"the experiment {params.tracking.experiment!r}"):
        experiment_id = _experiment_id(params.tracking.experiment, root, uri)
    mlflow.set_experiment(experiment_id=experiment_id)  # nested runs and logged models land here too
    commit = git_commit(root)
    tags = {
        "stage": stage,
        "family_member": member or "",
        "git_commit": commit,
        "data_hash": data_hash or "",
        "pipeline_run": pipeline_run_id(params, commit),
        "reference": str(reference).lower(),
    }
    with writing(uri, "the stage's run"):
        mark_killed_runs(experiment_id, stage, member)
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage,
            tags={**tags, OWNER_TAG: f"{socket.gethostname()}:{os.getpid()}"},
        )
    with run:
        logged = {}
        for section in sections:
            logged.update(flatten(params.section(section), f"{section}."))
        # MLflow caps param values at 6000 characters; params here are short.
        with writing(uri, "the stage's params"):
            mlflow.log_params({key: str(value) for key, value in logged.items()})
        yield run


@contextlib.contextmanager
def writing(uri: str | None, what: str) -> Iterator[None]:
    """MLflow write failures (a read-only or full database, a server error) as the retryable error."""
    try:
        yield
    except Exception as error:
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "the tracking store")
        root = error
        while root.__cause__ is not None or root.__context__ is not None:  # the driver's own words
            root = root.__cause__ or root.__context__
        reason = " ".join(str(root).split("\n", 1)[0].split())[:200]
        raise TransientError(
            f"could not write {what} to MLflow at {uri} ({type(root).__name__}: {reason}); "
            "check that the tracking database is writable and its disk has space (or that the server "
            "is up), then run again"
        ) from None


def mark_killed_runs(experiment_id: str, stage: str, member: str | None) -> None:
    """Runs of this stage left RUNNING by a killed process (on this machine) become KILLED."""
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'",
        max_results=100,
    )
    for run in runs:
        owner_host, _, pid = run.data.tags.get(OWNER_TAG, "").rpartition(":")
        if run.data.tags.get("family_member", "") != (member or "") or owner_host != host or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("marking run %s KILLED: its process %s is gone", run.info.run_id, pid)
            client.set_terminated(run.info.run_id, status="KILLED")


def log_dataset(params: Params) -> None:
    """Log the prepared data as the active run's input dataset (MLflow's Dataset column; runs can be
    filtered by `dataset.name` or `dataset.digest`): named after its source, the digest of the split
    files (the manifest's content hash), the source file and the rows per split. Nothing when the data
    is not prepared yet."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    prepared = params.path(params.paths.prepared)
    try:
        manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    where = source.get("path") or source.get("name") or source.get("dataset") or str(prepared)
    local = params.path(where)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": every local source is one kind
        warnings.simplefilter("ignore")
        try:
            dataset_source = resolve_dataset_source(str(local if local.exists() else where))
        except Exception:  # a Hub id MLflow does not recognise: point at the prepared splits instead
            dataset_source = resolve_dataset_source(str(prepared.resolve()))
    dataset = MetaDataset(dataset_source, name=f"{source.get('type', 'data')}:{Path(where).name}",
                          digest=manifest.get("content_hash", "")[:12])
    tags = {"content_hash": manifest.get("content_hash", ""), "task_type": manifest.get("task_type", "single_label")}
    tags.update({f"rows_{split}": str(info.get("rows")) for split, info in manifest.get("splits", {}).items()})
    with writing(None, "the run's input dataset"):
        mlflow.log_input(dataset, context="prepared_splits", tags=tags)


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log every finite scalar in `metrics` (nested dicts are flattened with dots)."""
    import math

    import mlflow

    scalars = {
        key.replace("@", "_"): float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
    if scalars:
        with writing(None, "metrics"):
            mlflow.log_metrics(scalars, step=step)


def set_tags(tags: dict[str, str]) -> None:
    """Tag the active run (MLflow caps a tag's value at 5000 characters)."""
    import mlflow

    with writing(None, "tags"):
        mlflow.set_tags({key: str(value)[:5000] for key, value in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    path = Path(path)
    with writing(None, f"the artifact {path.name}"):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path)
