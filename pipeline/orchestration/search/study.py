"""One trial and the study that runs them: a trial's private params and directory, the Optuna study
(sampler, resumed trials), measuring a trial's INT8 model, and the worker loop that runs trials."""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Params, params_from_dict
from pipeline.config.search import SearchConfig
from pipeline.errors import FinCompressError, GateError
from pipeline.orchestration.search.goals import Outcome, constraints, meets_goals, stop_reason
from pipeline.orchestration.search.space import INT8_DIR, overrides_for, suggest, with_overrides

log = logging.getLogger(__name__)


def trial_dir(params: Params, study: str, number: int) -> Path:
    return params.path(params.paths.checkpoints).parent / "search" / study / f"trial-{number}"


def view_dir(params: Params, study: str) -> Path:
    """The study's view of the prepared data, without the test split."""
    return params.path(params.paths.checkpoints).parent / "search" / study / "prepared"


# Read by the trials from the workspace (DVC's outputs upstream of them); every other path is the trial's own.
UPSTREAM_PATHS = ("prepared", "teacher", "teacher_logits")
ONNX_DIR = "onnx_student"  # the trial's paths.onnx_student (see trial_params)


def trial_params(params: Params, values: dict[str, Any], directory: Path, prepared_view: Path) -> Params:
    """The params a trial's stages run with: its configuration, every output under `directory`, the
    prepared data from the view without the test split, and no teacher export."""
    method = values["kd_method"]
    # Derived from Paths, so an output path added later cannot write into the workspace from a trial.
    outputs = {
        f"paths.{name}": str(directory / (name + Path(value).suffix))
        for name, value in params.paths.model_dump().items() if name not in UPSTREAM_PATHS
    }
    outputs.update({"paths.prepared": str(prepared_view), "export_onnx.export_teacher": False})
    overrides = {**overrides_for(values, params), **outputs, "prune.source": str(directory / f"student_{method}")}
    return with_overrides(params, overrides, source=f"search trial {directory.name}")


def int8_member(values: dict[str, Any], directory: Path, name: str) -> Any:
    from pipeline.evaluation.family import OnnxInt8Member, OnnxInt8StaticMember

    kind = OnnxInt8Member if values["quantization"] == "dynamic" else OnnxInt8StaticMember
    return kind(name, directory / ONNX_DIR / INT8_DIR[values["quantization"]])


def keep_only_int8(directory: Path, values: dict[str, Any]) -> None:
    """A finished trial keeps its INT8 model (a few MB, re-timed at the end) and its metrics; the
    students, the pruned model and the fp32 ONNX model go."""
    keep = {ONNX_DIR, "metrics", "curves"}
    for child in directory.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
    for child in (directory / ONNX_DIR).iterdir() if (directory / ONNX_DIR).is_dir() else []:
        if child.name != INT8_DIR[values["quantization"]]:
            shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------- the study

DIRECTIONS = ("maximize", "minimize", "minimize")  # validation macro-F1, p50 ms, size MB


def make_sampler(cfg: SearchConfig, seed: int | None = None) -> Any:
    """TPE or NSGA-II (seeded with `seed`, default search.seed). Both read the goals as the constraints
    each trial sets (Trial.set_constraint, Optuna >= 5): infeasible trials rank after feasible ones, by
    how far they miss."""
    import optuna

    seed = cfg.seed if seed is None else seed
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=min(50, max(2, cfg.budget.trials // 2)), seed=seed)
    # TPE's default of 10 random start-up trials is most of a small budget.
    return optuna.samplers.TPESampler(n_startup_trials=min(10, max(2, cfg.budget.trials // 3)), seed=seed)


def worker_seed(cfg: SearchConfig, worker: int, trials_so_far: int) -> int:
    """Each worker's own sampler seed. Workers seeded alike proposed the same configuration side by side
    (both built it: seen on PhraseBank with --jobs 2), and a resumed search replayed its first
    proposals; worker 0 of a new study keeps search.seed, so a one-worker search is reproducible."""
    return cfg.seed + 1000 * worker + trials_so_far


def open_study(params: Params, storage: Path, name: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage.parent.mkdir(parents=True, exist_ok=True)
    rdb = optuna.storages.RDBStorage(
        f"sqlite:///{storage}", engine_kwargs={"connect_args": {"timeout": 120}},  # worker processes share it
    )
    return optuna.create_study(
        storage=rdb, study_name=name, directions=list(DIRECTIONS), sampler=make_sampler(params.search),
        load_if_exists=True,
    )


def outcome_of(trial: Any) -> Outcome:
    attrs = trial.user_attrs
    return Outcome(
        number=trial.number, state=trial.state.name, retention=attrs.get("retention"),
        latency_ms=attrs.get("latency_ms_p50"), size_mb=attrs.get("size_mb"),
        validation_macro_f1=attrs.get("validation_macro_f1"), values=dict(attrs.get("values", trial.params)),
    )


def fail_abandoned_trials(study: Any) -> list[int]:
    """Trials left RUNNING by a stopped search become FAIL, so a resumed search counts and reruns cleanly."""
    from optuna.trial import TrialState

    abandoned = [trial.number for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in abandoned:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return abandoned


@dataclass(frozen=True)
class SearchContext:
    """What every worker needs to run trials; plain data, so it travels to other processes."""

    params_tree: dict[str, Any]
    root: str
    storage: str
    study: str
    prepared_view: str
    teacher_validation_f1: float
    deadline: float  # time.time() after which no trial starts
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    def params(self) -> Params:
        return params_from_dict(self.params_tree, root=Path(self.root), source="search")


# compress(params) runs the compression stages for one trial's params (scripts/search.py wires them).
Compress = Callable[[Params, str], None]


def measure_trial(params: Params, values: dict[str, Any], directory: Path, number: int) -> dict[str, Any]:
    """The trial's INT8 model: validation F1 from its record, size on disk, and a short p50 at 1 thread
    over validation texts."""
    from pipeline.data.prepared import load_prepared
    from pipeline.evaluation.latency import one_thread_latency, quiet_machine
    from pipeline.evaluation.record import ModelRecord

    member = int8_member(values, directory, f"trial-{number}")
    excluded = member.excluded_reason()
    if excluded:  # e.g. static INT8 failing its parity gate: the trial fails with export_onnx's reason
        raise GateError(f"export_onnx left out the trial's {values['quantization']} INT8 model: {excluded}")
    record = ModelRecord.read(member.path)
    texts = load_prepared(params.path(params.paths.prepared)).texts("validation")
    cfg = params.search.latency
    with quiet_machine():  # one timing on this machine at a time (other workers may be training)
        timing = one_thread_latency(
            [member], texts, params.task.max_length, cfg.min_runs, cfg.min_seconds, cfg.warmup_runs, cfg.rounds,
            params.search.seed + number,
        )
    return {
        "validation_macro_f1": record.validation["macro_f1"],
        "latency_ms_p50": timing[member.name]["p50"],
        "size_mb": round(member.size_mb(), 3),
        "model_dir": str(member.path),
    }


@contextmanager
def child_run(context: SearchContext, number: int, values: dict[str, Any]) -> Iterator[Any]:
    """The trial's MLflow run, nested under the search's run."""
    import mlflow

    if context.parent_run_id is None:
        yield None
        return
    if context.tracking_uri:
        mlflow.set_tracking_uri(context.tracking_uri)
    parent = mlflow.get_run(context.parent_run_id)
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id, run_name=f"trial-{number}", nested=True,
        parent_run_id=context.parent_run_id, tags={"search_study": context.study, "search_trial": str(number)},
    ) as run:
        mlflow.log_params({f"space.{key}": value for key, value in values.items()})
        yield run


def run_one_trial(study: Any, trial: Any, context: SearchContext, compress: Compress) -> Outcome:
    """Build and measure the configuration of a started (asked) trial, and tell Optuna; a failing trial
    (a gate, bad params for this teacher, a crash) is recorded as FAIL and the search goes on."""
    import mlflow
    from optuna.trial import TrialState

    params = context.params()
    cfg = params.search
    values = suggest(trial, cfg.space)
    trial.set_user_attr("values", values)  # fixed dimensions too (trial.params has the sampled ones)
    directory = trial_dir(params, context.study, trial.number)
    started = time.monotonic()
    with child_run(context, trial.number, values) as run:
        state, measured, error = TrialState.COMPLETE, {}, None
        duplicate = _same_configuration(study, trial.number, values)
        try:
            if duplicate is not None:  # the sampler proposed a configuration already built: reuse it
                measured = {key: duplicate.user_attrs[key] for key in
                            ("validation_macro_f1", "latency_ms_p50", "size_mb", "model_dir")}
                trial.set_user_attr("duplicate_of", duplicate.number)
            else:
                if directory.exists():
                    shutil.rmtree(directory)
                directory.mkdir(parents=True)
                run_params = trial_params(params, values, directory, Path(context.prepared_view))
                compress(run_params, values["kd_method"])
                keep_only_int8(directory, values)
                measured = measure_trial(run_params, values, directory, trial.number)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            raise
        except FinCompressError as failure:
            state, error = TrialState.FAIL, f"{type(failure).__name__}: {failure}"
        except Exception as failure:  # a bug or the environment: the trial fails, the search goes on
            state, error = TrialState.FAIL, f"{type(failure).__name__}: {failure}"
            log.error("trial %d crashed:\n%s", trial.number, traceback.format_exc())
        seconds = time.monotonic() - started
        trial.set_user_attr("seconds", round(seconds, 1))
        if state == TrialState.COMPLETE:
            measured["retention"] = measured["validation_macro_f1"] / context.teacher_validation_f1
            for key, value in measured.items():
                trial.set_user_attr(key, value)
            outcome = Outcome(trial.number, "COMPLETE", measured["retention"], measured["latency_ms_p50"],
                              measured["size_mb"], measured["validation_macro_f1"], values)
            for goal, value in constraints(outcome, cfg.goals).items():
                trial.set_constraint(goal, value)
            study.tell(trial, [measured["validation_macro_f1"], measured["latency_ms_p50"], measured["size_mb"]])
            log.info("trial %d: validation macro-F1 %.4f (retention %.3f), p50 %.3f ms, %.2f MB, %.0f s%s",
                     trial.number, measured["validation_macro_f1"], measured["retention"],
                     measured["latency_ms_p50"], measured["size_mb"], seconds,
                     ", meets the goals" if meets_goals(outcome, cfg.goals) else "")
        else:
            shutil.rmtree(directory, ignore_errors=True)  # a failed trial's students are hundreds of MB
            trial.set_user_attr("error", error[:2000])
            study.tell(trial, state=state)
            outcome = Outcome(trial.number, state.name, values=values)
            log.warning("trial %d failed: %s", trial.number, error[:500])
        if run is not None:
            mlflow.set_tag("state", state.name)
            numbers = {k: v for k, v in measured.items() if isinstance(v, (int, float))}
            mlflow.log_metrics({**numbers, "seconds": seconds, "meets_goals": float(meets_goals(outcome, cfg.goals))})
            if error:
                mlflow.set_tag("error", error[:5000])
    if run is not None and error:  # after the run's context closed it FINISHED (ending it inside would end the parent too)
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")
    return outcome


def _same_configuration(study: Any, number: int, values: dict[str, Any]) -> Any:
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.number != number and other.user_attrs.get("values") == values and "model_dir" in other.user_attrs:
            return other
    return None


def search_worker(context: SearchContext, compress: Compress, torch_threads: int | None = None, worker: int = 0) -> int:
    """Run trials until a stop reason holds; returns how many this worker ran. Workers in other
    processes (or on a Dask cluster) share the study through its storage; `worker` numbers them."""
    from optuna.trial import TrialState

    from pipeline.io import exclusive_lock

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    logging.getLogger("pipeline").setLevel(logging.INFO)  # each trial's result line, also in a Dask worker

    params = context.params()
    study = open_study(params, Path(context.storage), context.study)
    study.sampler = make_sampler(params.search, worker_seed(params.search, worker, len(study.trials)))
    ran = 0
    while True:
        # Deciding to start a trial and starting it is one step for all workers, so N workers never
        # overrun the trial budget (a shared filesystem on a Dask cluster, as for the project itself).
        with exclusive_lock(Path(context.prepared_view).parent / "start.lock", "starting a trial", wait=True):
            trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]  # enqueued: not started
            finished = [outcome_of(t) for t in trials if t.state != TrialState.RUNNING]
            durations = sorted(t.user_attrs["seconds"] for t in trials
                               if t.state == TrialState.COMPLETE and "seconds" in t.user_attrs)
            typical = durations[len(durations) // 2] if durations else None
            reason = stop_reason(finished, len(trials), params.search, context.deadline - time.time(), typical)
            trial = None if reason else study.ask()
        if trial is None:
            log.info("search worker stops: %s", reason)
            return ran
        run_one_trial(study, trial, context, compress)
        ran += 1
