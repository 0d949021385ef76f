"""The whole search: the parent MLflow run, the workers (processes, or a Dask cluster), `run_search`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.errors import TransientError
from pipeline.orchestration.search.answer import summarize
from pipeline.orchestration.search.goals import stop_reason
from pipeline.orchestration.search.space import check_space, params_tree, storage_path, study_name
from pipeline.orchestration.search.study import (
    Compress,
    SearchContext,
    fail_abandoned_trials,
    open_study,
    outcome_of,
    search_worker,
    view_dir,
)

log = logging.getLogger(__name__)


def teacher_validation_f1(params: Params) -> float:
    from pipeline.evaluation.record import ModelRecord

    return ModelRecord.read(params.path(params.paths.teacher)).validation["macro_f1"]


@contextmanager
def parent_run(params: Params, study: str) -> Iterator[Any]:
    """The search's MLflow run; the trials are its nested runs."""
    import mlflow

    from pipeline import tracking

    uri = tracking.tracking_uri(params)
    tracking.check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = tracking._experiment_id(params.tracking.experiment, tracking.project_root(params), uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"search {study}",
                          tags={"stage": "search", "search_study": study,
                                "git_commit": tracking.git_commit(tracking.project_root(params))}) as run:
        mlflow.log_params(tracking.flatten(params.section("search"), "search."))
        yield run


NO_WORKERS_SECONDS = 120.0


def wait_while_workers_live(client: Any, futures: list[Any], poll: float = 5.0) -> None:
    """Wait for `futures`; raise when the cluster has had no worker at all for NO_WORKERS_SECONDS while
    they are pending (their processes gone and not replaced), instead of waiting forever."""
    from dask.distributed import wait

    empty_since = None
    while True:
        try:
            wait(futures, timeout=poll)
        except TimeoutError:  # dask's is the builtin one
            pass
        pending = [future for future in futures if not future.done()]
        if not pending:
            return
        if client.scheduler_info().get("workers"):
            empty_since = None
            continue
        empty_since = empty_since or time.monotonic()
        if time.monotonic() - empty_since > NO_WORKERS_SECONDS:
            raise TransientError(
                f"the Dask cluster at {client.scheduler.address} has had no worker for {NO_WORKERS_SECONDS:.0f} s "
                f"while {len(pending)} search worker(s) were pending: its worker processes ended and were not "
                "replaced (see the worker logs above); the finished trials are kept: run the search again to resume"
            )


def run_workers_on_dask(jobs: int, context: SearchContext, compress: Compress, dask_address: str | None) -> None:
    """`jobs` search workers sharing the study: on the Dask cluster at `dask_address`, else on a local
    cluster of `jobs` one-thread processes. Dask rather than a multiprocessing pool: a worker process
    that dies is replaced and its search worker restarted (the trial it was running counts as failed),
    and one that keeps dying ends the search with a message instead of a wait forever."""
    from dask.distributed import Client, KilledWorker, LocalCluster

    threads = max(1, (os.cpu_count() or 1) // jobs)  # torch threads per worker (cores of this machine)
    with ExitStack() as stack:
        if dask_address is None:
            # No memory limit: the nanny would otherwise kill a worker training beside a large teacher.
            cluster = stack.enter_context(LocalCluster(
                n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=None))
            dask_address = cluster.scheduler_address
        client = stack.enter_context(Client(dask_address))
        futures = [client.submit(search_worker, context, compress, threads, worker, pure=False) for worker in range(jobs)]
        try:
            wait_while_workers_live(client, futures)
            client.gather(futures)
        except KilledWorker as error:
            raise TransientError(
                f"search worker processes kept dying ({error}); the finished trials are kept in {context.storage}: "
                "fix the cause (memory? see the worker logs above), then run the search again to resume it"
            ) from error


def run_search(
    params: Params, compress: Compress, *, jobs: int | None = None, dask_address: str | None = None,
    storage: Path | None = None, extra_overrides: list[str] = (),
) -> dict[str, Any]:
    """Run (or resume) the search of `params.search` and write reports/search/; returns the summary.
    `compress(params, kd_method)` runs the compression stages of one trial (scripts/search.py)."""
    import mlflow

    from pipeline.data.prepared import write_view
    from pipeline.io import exclusive_lock

    check_space(params)
    cfg = params.search
    jobs = jobs or cfg.jobs
    name = study_name(params)
    storage = storage or storage_path(params)
    started = time.time()
    view = view_dir(params, name)
    view.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(view.parent / "search.lock", f"the search {name}"):
        write_view(params.path(params.paths.prepared), view)  # train + validation (+ transfer), no test
        teacher_f1 = teacher_validation_f1(params)
        study = open_study(params, storage, name)
        abandoned = fail_abandoned_trials(study)
        if abandoned:
            log.info("resuming %s: trials %s were left running by a stopped search and count as failed", name, abandoned)
        done = len(study.trials)
        log.info("search %s in %s: %d trials so far, goals %s", name, storage, done, cfg.goals.model_dump())
        with parent_run(params, name) as run:
            context = SearchContext(
                params_tree=params_tree(params), root=str(params.root), storage=str(storage), study=name,
                prepared_view=str(view), teacher_validation_f1=teacher_f1,
                deadline=started + cfg.budget.minutes * 60, parent_run_id=run.info.run_id,
                tracking_uri=mlflow.get_tracking_uri(),
            )
            if dask_address or jobs > 1:
                run_workers_on_dask(jobs, context, compress, dask_address)
            else:
                search_worker(context, compress)
            study = open_study(params, storage, name)
            lost = fail_abandoned_trials(study)  # every worker has returned: a RUNNING trial lost its worker
            if lost:
                log.warning("trials %s were running in a worker process that died; they count as failed", lost)
            outcomes = [outcome_of(t) for t in study.get_trials(deepcopy=False)]
            durations = [t.user_attrs.get("seconds") for t in study.trials if t.user_attrs.get("seconds")]
            stop = stop_reason(outcomes, len(outcomes), cfg, context.deadline - time.time(),
                               sorted(durations)[len(durations) // 2] if durations else None)
            summary = summarize(params, study, teacher_f1, started, stop, extra_overrides)
            winner = summary["winner"]
            if winner:
                mlflow.log_metrics({f"winner_{key}": winner[key] for key in
                                    ("validation_macro_f1", "retention", "latency_ms_p50", "size_mb")})
                mlflow.set_tag("winner_trial", str(winner["trial"]))
            mlflow.log_artifacts(str(params.path(params.paths.reports) / "search"), "search")
    return summary
