"""Compress to a goal: an Optuna search over the compression recipe for the fastest ONNX INT8 model that
meets the user's goals (validation macro-F1 retention against the teacher, p50 latency at batch 1 and 1
thread, size on disk), within a budget of trials and minutes.

Every search dimension (params `search.space`) maps onto existing params keys, so a trial is a params
override: the student (depth, init, KD method and weights), the pruning (heads, FFN neurons, vocabulary
kept) and the INT8 scheme. A trial runs the student stage, prune and export_onnx for its params into
trial-private paths, on a view of the prepared data WITHOUT the test split (pipeline.data.prepared.write_view:
its file is absent and reading it is an error), then times the INT8 model with the benchmark harness.
The test split is read once, after the search, when the winner is rebuilt as a DVC experiment.

Optuna (multi-objective: validation F1 up, p50 down, size down; the goals as constraints) keeps the
study in a sqlite file beside the MLflow database, so a stopped search resumes where it was. Once a trial
meets every goal, only a strictly faster model (or as fast and smaller) counts as progress, and the
search stops after `search.patience` trials without any.

This module is the library: it never imports the stages. scripts/search.py wires the stages in and is
the command line (`make search`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params, params_from_dict
from pipeline.config.search import INTEGER_DIMENSIONS, Choices, Range, SearchConfig, SearchGoals
from pipeline.errors import ConfigError, FinCompressError, TransientError
from pipeline.io import write_json, write_text_atomic

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the space

# Dimensions that map onto one params key whatever the KD method.
DIRECT_KEYS = {
    "num_layers": "student.num_layers",
    "init": "student.init",
    "heads_ratio": "prune.heads_ratio",
    "ffn_ratio": "prune.ffn_ratio",
    "vocab_keep_top": "prune.vocab_keep_top",
    "quantization": "export_onnx.quantization",
}
# The KD weights each method reads (from its own params section); the baseline reads none.
KD_WEIGHTS = {
    "baseline": (),
    "vanilla": ("alpha", "temperature"),
    "intermediate": ("alpha", "temperature", "hidden_weight", "attention_weight"),
}
KD_STAGE = {"baseline": "student_baseline", "vanilla": "distill_vanilla", "intermediate": "distill_intermediate"}
KD_SECTION = {"vanilla": "distill_vanilla", "intermediate": "distill_intermediate"}
INT8_DIR = {"dynamic": "int8", "static": "int8_static"}
# The sections whose values shape a trial's result (with search.goals/space/seed/sampler/latency): the
# study name is a hash of them, so changing any starts a new study and an unchanged search resumes.
SHAPING_SECTIONS = (
    "task", "data", "transfer", "teacher", "verify_teacher", "student", "distill_vanilla",
    "distill_intermediate", "prune", "export_onnx", "evaluation",
)


def suggest(trial: Any, space: Any) -> dict[str, Any]:
    """The trial's value of every dimension (a fixed one as given); KD weights only for the methods
    that read them, so the sampler never learns from a weight that had no effect."""

    def pick(name: str) -> Any:
        spec = getattr(space, name)
        if isinstance(spec, Choices):
            return trial.suggest_categorical(name, spec.choices)
        if isinstance(spec, Range):
            if name in INTEGER_DIMENSIONS:
                return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
            return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
        return spec

    values = {name: pick(name) for name in (*DIRECT_KEYS, "kd_method")}
    for name in KD_WEIGHTS[values["kd_method"]]:
        values[name] = pick(name)
    return values


def overrides_for(values: dict[str, Any], params: Params) -> dict[str, Any]:
    """The params overrides (dotted key -> value) of one configuration: what `dvc exp run -S` needs to
    rebuild it as the family's compressed member."""
    method = values["kd_method"]
    overrides = {DIRECT_KEYS[name]: values[name] for name in DIRECT_KEYS}
    overrides["prune.source"] = getattr(params.paths, f"student_{method}")
    for name in KD_WEIGHTS[method]:
        overrides[f"{KD_SECTION[method]}.{name}"] = values[name]
    return overrides


def _tree(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude={"root"})


def with_overrides(params: Params, overrides: dict[str, Any], source: str = "search") -> Params:
    """`params` with dotted-key overrides applied, validated like params.yaml."""
    tree = _tree(params)
    for key, value in overrides.items():
        node = tree
        *sections, last = key.split(".")
        for section in sections:
            node = node[section]
        if last not in node:
            raise ConfigError(f"{source}: {key} is not a params key")
        node[last] = value
    return params_from_dict(tree, root=params.root, source=source)


def _extremes(spec: Any) -> list[Any]:
    if isinstance(spec, Choices):
        return list(spec.choices)
    if isinstance(spec, Range):
        return [spec.low, spec.high]
    return [spec]


def check_space(params: Params) -> None:
    """Fail before any trial when a value of the space is not a valid params value (e.g. a heads_ratio
    range reaching 1.0), naming the dimension and the params key."""
    space = params.search.space
    methods = _extremes(space.kd_method)
    for name in (*DIRECT_KEYS, "kd_method", "alpha", "temperature", "hidden_weight", "attention_weight"):
        for value in _extremes(getattr(space, name)):
            if name in DIRECT_KEYS:
                keys = [DIRECT_KEYS[name]]
            elif name == "kd_method":
                keys = []
            else:
                keys = [f"{KD_SECTION[m]}.{name}" for m in methods if name in KD_WEIGHTS[m]]
            if isinstance(value, float) and name in INTEGER_DIMENSIONS:
                value = int(value)
            try:
                with_overrides(params, dict.fromkeys(keys, value))
            except ConfigError as error:
                detail = str(error).split("\n", 1)[-1].strip()
                raise ConfigError(
                    f"search.space.{name}: the value {value!r} is not valid for {', '.join(keys)} ({detail}); "
                    "narrow the range or the choices"
                ) from None


def study_name(params: Params) -> str:
    """search.study, or a name derived from everything that shapes a trial's result (the prepared data's
    content hash included)."""
    from pipeline.stage import data_hash

    if params.search.study:
        return params.search.study
    shaping = {name: params.section(name) for name in SHAPING_SECTIONS} | {"data_hash": data_hash(params)}
    search = params.search.model_dump(mode="json", include={"goals", "space", "seed", "sampler", "latency"})
    digest = hashlib.sha256(json.dumps([shaping, search], sort_keys=True).encode()).hexdigest()[:10]
    return f"search-{digest}"


def storage_path(params: Params) -> Path:
    """The Optuna database: search.db beside the MLflow database (a local sqlite file), else in the
    project root."""
    from pipeline.tracking import project_root

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "search.db"
    return project_root(params) / "search.db"


# --------------------------------------------------------------------------- goals and stopping


@dataclass(frozen=True)
class Outcome:
    """One finished trial, as the goal and stopping logic sees it."""

    number: int
    state: str  # COMPLETE | FAIL | PRUNED
    retention: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    validation_macro_f1: float | None = None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and self.latency_ms is not None


GOAL_AXES = (
    # goal key, outcome attribute, +1 when the value must be at least the goal, -1 at most
    ("min_retention", "retention", +1),
    ("max_latency_ms", "latency_ms", -1),
    ("max_size_mb", "size_mb", -1),
)


def shortfalls(outcome: Outcome, goals: SearchGoals) -> dict[str, float]:
    """Per goal set: how far the trial is from it (0 when met)."""
    gaps = {}
    for goal, attribute, sign in GOAL_AXES:
        target = getattr(goals, goal)
        if target is not None:
            gaps[goal] = max(0.0, sign * (target - getattr(outcome, attribute)))
    return gaps


def constraints(outcome: Outcome, goals: SearchGoals) -> dict[str, float]:
    """Optuna's constraint values (feasible when every one is <= 0), one per goal set."""
    values = {}
    for goal, attribute, sign in GOAL_AXES:
        target = getattr(goals, goal)
        if target is not None:
            values[goal] = sign * (target - getattr(outcome, attribute))
    return values


def meets_goals(outcome: Outcome, goals: SearchGoals) -> bool:
    return outcome.complete and all(gap == 0 for gap in shortfalls(outcome, goals).values())


def improves(candidate: Outcome, best: Outcome | None) -> bool:
    """Among trials meeting the goals: strictly faster, or as fast and smaller."""
    if best is None:
        return True
    if candidate.latency_ms != best.latency_ms:
        return candidate.latency_ms < best.latency_ms
    return candidate.size_mb < best.size_mb


def trials_without_improvement(outcomes: list[Outcome], goals: SearchGoals) -> int | None:
    """Finished trials since the last improvement among those meeting the goals; None until one meets them."""
    best, since = None, None
    for outcome in sorted(outcomes, key=lambda o: o.number):
        if meets_goals(outcome, goals) and improves(outcome, best):
            best, since = outcome, 0
        elif since is not None:
            since += 1
    return since


def stop_reason(
    outcomes: list[Outcome], started: int, cfg: SearchConfig, seconds_left: float, trial_seconds: float | None
) -> str | None:
    """Why no further trial should start, or None. `started`: trials in the study (running included);
    `trial_seconds`: what a trial has typically taken (None before the first one ends)."""
    if started >= cfg.budget.trials:
        return f"trial budget used ({started} of {cfg.budget.trials})"
    if seconds_left <= 0:
        return f"time budget used ({cfg.budget.minutes:g} minutes)"
    if trial_seconds is not None and trial_seconds > seconds_left:
        return f"time budget: {seconds_left / 60:.1f} minutes left, a trial takes about {trial_seconds / 60:.1f}"
    since = trials_without_improvement(outcomes, cfg.goals)
    if since is not None and since >= cfg.patience:
        return f"patience: {since} trials without a faster model meeting the goals"
    return None


def pareto_front(outcomes: list[Outcome]) -> list[int]:
    """Numbers of the complete trials no other complete trial beats on validation F1, latency and size
    at once (at least as good on all three, better on one)."""
    complete = [o for o in outcomes if o.complete]

    def dominates(a: Outcome, b: Outcome) -> bool:
        no_worse = (a.validation_macro_f1 >= b.validation_macro_f1 and a.latency_ms <= b.latency_ms
                    and a.size_mb <= b.size_mb)
        better = (a.validation_macro_f1 > b.validation_macro_f1 or a.latency_ms < b.latency_ms
                  or a.size_mb < b.size_mb)
        return no_worse and better

    return sorted(o.number for o in complete if not any(dominates(other, o) for other in complete))


def describe_gap(goal: str, outcome: Outcome, goals: SearchGoals) -> str:
    """E.g. "retention 0.982, 0.008 short of 0.99"."""
    target = getattr(goals, goal)
    gap = shortfalls(outcome, goals)[goal]
    if goal == "min_retention":
        text = f"retention {outcome.retention:.3f}"
        return f"{text}, meets {target:g}" if gap == 0 else f"{text}, {gap:.3f} short of {target:g}"
    if goal == "max_latency_ms":
        text = f"p50 {outcome.latency_ms:.3f} ms"
        return f"{text}, meets {target:g} ms" if gap == 0 else f"{text}, {gap:.3f} ms over {target:g} ms"
    text = f"size {outcome.size_mb:.2f} MB"
    return f"{text}, meets {target:g} MB" if gap == 0 else f"{text}, {gap:.2f} MB over {target:g} MB"


def closest(outcomes: list[Outcome], goals: SearchGoals) -> dict[str, Any]:
    """When no trial meets every goal: per goal the trial closest to it, and the trial closest overall
    (smallest sum of shortfalls relative to each goal)."""
    complete = [o for o in outcomes if o.complete]
    if not complete:
        return {}
    per_goal = {}
    for goal, _, _ in GOAL_AXES:
        if getattr(goals, goal) is None:
            continue
        nearest = min(complete, key=lambda o: (shortfalls(o, goals)[goal], o.number))
        per_goal[goal] = {"trial": nearest.number, "distance": shortfalls(nearest, goals)[goal],
                          "text": describe_gap(goal, nearest, goals)}

    def relative(o: Outcome) -> float:
        return sum(gap / getattr(goals, goal) for goal, gap in shortfalls(o, goals).items())

    overall = min(complete, key=lambda o: (relative(o), o.number))
    return {
        "per_goal": per_goal,
        "overall": {"trial": overall.number, "relative_distance": relative(overall),
                    "gaps": [describe_gap(goal, overall, goals) for goal in shortfalls(overall, goals)]},
    }


# --------------------------------------------------------------------------- one trial


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


# --------------------------------------------------------------------------- the answer


def trial_rows(study: Any, goals: SearchGoals, remeasured: dict[int, float]) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        outcome = outcome_of(trial)
        attrs = trial.user_attrs
        rows.append({
            "trial": trial.number,
            "state": trial.state.name,
            **{f"space.{key}": value for key, value in outcome.values.items()},
            "validation_macro_f1": attrs.get("validation_macro_f1"),
            "retention": attrs.get("retention"),
            "latency_ms_p50": attrs.get("latency_ms_p50"),
            "latency_ms_p50_remeasured": remeasured.get(trial.number),
            "size_mb": attrs.get("size_mb"),
            "meets_goals": meets_goals(outcome, goals),
            "seconds": attrs.get("seconds"),
            "duplicate_of": attrs.get("duplicate_of"),
            "error": attrs.get("error"),
        })
    return rows


def remeasure(params: Params, study: Any, numbers: list[int]) -> dict[int, float]:
    """The candidates' p50 again, side by side in ONE interleaved run (trial timings taken while other
    workers trained are noisy), with the benchmark section's run lengths."""
    from pipeline.data.prepared import load_prepared
    from pipeline.evaluation.family import MEMBER_KINDS
    from pipeline.evaluation.latency import one_thread_latency, quiet_machine

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    members, seen = [], set()
    for number in numbers:
        trial = by_number[number]
        model_dir = Path(trial.user_attrs["model_dir"])
        if model_dir in seen or not model_dir.is_dir():
            continue
        seen.add(model_dir)
        kind = "onnx_int8" if outcome_of(trial).values["quantization"] == "dynamic" else "onnx_int8_static"
        members.append(MEMBER_KINDS[kind](f"trial-{number}", model_dir))
    if not members:
        return {}
    view = load_prepared(view_dir(params, study.study_name))
    cfg = params.benchmark
    with quiet_machine():
        timing = one_thread_latency(members, view.texts("validation"), params.task.max_length, cfg.min_runs,
                                    cfg.min_seconds, cfg.warmup_runs, cfg.rounds, cfg.seed)
    found = {int(name.removeprefix("trial-")): result["p50"] for name, result in timing.items()}
    # A duplicate trial is the same model: it gets its original's timing.
    for number in numbers:
        original = by_number[number].user_attrs.get("duplicate_of")
        if original is not None and original in found:
            found[number] = found[original]
    return found


def exp_command(name: str, overrides: dict[str, Any], extra: list[str] = (), temp: bool = False) -> list[str]:
    """`dvc exp run` rebuilding the configuration as the family's compressed member."""
    command = ["dvc", "exp", "run", *(["--temp"] if temp else []), "--name", name]
    for key, value in [*overrides.items()]:
        command += ["-S", f"{key}={_yaml_scalar(value)}"]
    for override in extra:
        command += ["-S", override]
    return command


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def answer(o: Outcome, name: str, params: Params, extra_overrides: list[str]) -> dict[str, Any]:
    """A trial as the search's answer: its figures, its params overrides and the `dvc exp run` that
    rebuilds it as the family's compressed member under `name`."""
    overrides = overrides_for(o.values, params)
    return {
        "trial": o.number,
        "validation_macro_f1": o.validation_macro_f1,
        "retention": o.retention,
        "latency_ms_p50": o.latency_ms,
        "size_mb": o.size_mb,
        "values": o.values,
        "overrides": overrides,
        "member": "student_onnx_int8" if o.values["quantization"] == "dynamic" else "student_onnx_int8_static",
        "dvc_exp_name": name,
        "dvc_exp_run": " ".join(exp_command(name, overrides, extra_overrides)),
    }


def to_build(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The answer `--build-winner` rebuilds: the winner, else the closest trial overall, else nothing."""
    if summary["winner"]:
        return summary["winner"]
    return ((summary.get("closest") or {}).get("overall") or {}).get("answer")


def summarize(
    params: Params, study: Any, teacher_validation_f1: float, started: float, stop: str | None,
    extra_overrides: list[str] = (),
) -> dict[str, Any]:
    """Re-time the candidates, choose the winner, write reports/search/ and return the summary."""
    from pipeline.evaluation.plots import search_plot

    cfg = params.search
    goals = cfg.goals
    outcomes = [outcome_of(t) for t in study.get_trials(deepcopy=False)]
    complete = [o for o in outcomes if o.complete]
    front = pareto_front(outcomes)
    feasible = [o.number for o in complete if meets_goals(o, goals)]
    candidates = sorted(set(feasible) if feasible else set(front))
    remeasured = remeasure(params, study, candidates) if candidates else {}

    def final(o: Outcome) -> Outcome:  # the candidate with its side-by-side timing
        if o.number not in remeasured:
            return o
        return Outcome(o.number, o.state, o.retention, remeasured[o.number], o.size_mb, o.validation_macro_f1, o.values)

    winner = None
    finals = [final(o) for o in complete if o.number in feasible]
    # The side-by-side timing may move a candidate past the latency goal: the winner meets it there too.
    winners = [o for o in finals if meets_goals(o, goals)]
    if winners:
        winner = min(winners, key=lambda o: (o.latency_ms, o.size_mb, o.number))
    out = params.path(params.paths.reports) / "search"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, goals, remeasured)
    write_csv(rows, out / "trials.csv")
    nearest = None if winner else closest([final(o) for o in outcomes], goals)
    starred = winner.number if winner else (nearest["overall"]["trial"] if nearest else None)
    search_plot([final(o) for o in complete], front, goals, teacher_validation_f1, out / "pareto.png",
                starred, "winner" if winner else "closest (no trial meets every goal)")
    summary: dict[str, Any] = {
        "study": study.study_name,
        "goals": goals.model_dump(mode="json"),
        "budget": cfg.budget.model_dump(mode="json"),
        "used": {
            "trials": len(outcomes),
            "complete": len(complete),
            "failed": sum(o.state == "FAIL" for o in outcomes),
            "minutes_this_run": round((time.time() - started) / 60, 1),
        },
        "stopped_because": stop,
        "teacher_validation_macro_f1": teacher_validation_f1,
        "pareto_front": front,
        "remeasured_p50_ms": {str(k): v for k, v in remeasured.items()},
        "winner": None,
        "closest": None,
    }
    if winner:
        summary["winner"] = answer(winner, f"{study.study_name}-winner", params, extra_overrides)
        write_text_atomic(out / "winner.yaml", yaml.safe_dump(summary["winner"]["overrides"], sort_keys=False))
    else:
        (out / "winner.yaml").unlink(missing_ok=True)
        summary["closest"] = nearest
        if nearest:
            # No winner: the closest trial is the answer, rebuilt the same way so its test figures are known.
            trial = final(next(o for o in outcomes if o.number == nearest["overall"]["trial"]))
            nearest["overall"]["answer"] = answer(trial, f"{study.study_name}-closest", params, extra_overrides)
    write_summary(summary, out)
    return summary


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_summary(summary: dict[str, Any], out: Path) -> None:
    write_json(out / "summary.json", summary)
    goals = summary["goals"]
    wanted = ", ".join(
        text for text in (
            goals["min_retention"] is not None and f"validation retention >= {goals['min_retention']:g}",
            goals["max_latency_ms"] is not None and f"p50 <= {goals['max_latency_ms']:g} ms (batch 1, 1 thread)",
            goals["max_size_mb"] is not None and f"size <= {goals['max_size_mb']:g} MB",
        ) if text
    ) or "none"
    used = summary["used"]
    lines = [
        f"# Search {summary['study']}",
        "",
        f"Goals: {wanted}. Budget: {summary['budget']['trials']} trials, {summary['budget']['minutes']:g} minutes "
        f"per run; used {used['trials']} trials ({used['complete']} complete, {used['failed']} failed), "
        f"{used['minutes_this_run']:g} minutes in this run. Stopped: {summary['stopped_because'] or 'budget'}.",
        f"Teacher validation macro-F1: {summary['teacher_validation_macro_f1']:.4f}. Every figure below is on the "
        "validation split; the test split was not read during the search.",
        "",
    ]
    winner = summary["winner"]
    if winner:
        lines += [
            f"## Winner: trial {winner['trial']} ({winner['member']})",
            "",
            f"- validation macro-F1 {winner['validation_macro_f1']:.4f}, retention {winner['retention']:.3f}",
            f"- p50 {winner['latency_ms_p50']:.3f} ms (re-timed side by side with the other candidates), "
            f"{winner['size_mb']:.2f} MB",
            "- params (winner.yaml): " + ", ".join(f"`{k}={v}`" for k, v in winner["overrides"].items()),
            "",
            "Rebuild it as the family's compressed member (then `dvc exp apply` it):",
            "",
            f"    {winner['dvc_exp_run']}",
            "",
        ]
        if "test" in winner:
            lines += [_test_line(winner), ""]
    else:
        lines += ["## No trial meets every goal", ""]
        near = summary["closest"] or {}
        for goal, entry in (near.get("per_goal") or {}).items():
            lines.append(f"- closest to {goal}: trial {entry['trial']}, {entry['text']}")
        if near.get("overall"):
            overall = near["overall"]
            lines.append(f"- closest overall: trial {overall['trial']} ({'; '.join(overall['gaps'])})")
            if overall.get("answer"):
                nearest = overall["answer"]
                lines += ["", "The closest trial's params: " + ", ".join(f"`{k}={v}`" for k, v in nearest["overrides"].items()),
                          "", "Rebuild it (it does not meet every goal):", "", f"    {nearest['dvc_exp_run']}"]
                if "test" in nearest:
                    lines += ["", _test_line(nearest)]
        if not near:
            lines.append("- no trial completed")
        lines.append("")
    lines += ["Trials: trials.csv. Validation macro-F1 against p50, Pareto front and goal box: pareto.png.", ""]
    write_text_atomic(out / "summary.md", "\n".join(lines))


def _test_line(answer: dict[str, Any]) -> str:
    test = answer["test"]
    return (f"Test split, read once after the search (experiment {answer['dvc_exp_name']}): macro-F1 "
            f"{test['macro_f1']:.4f}, retention {test['retention']:.3f} against the teacher's "
            f"{test['teacher_macro_f1']:.4f}.")


def read_exp_test_metrics(root: Path, name: str, member: str, metrics_dir: str = "reports/metrics") -> dict[str, float]:
    """The winner's test figures, from the metrics files of the DVC experiment `name` (git refs under
    refs/exps): the member's and the teacher's test macro-F1."""
    import subprocess

    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                          capture_output=True, text=True, check=True).stdout.split()
    matching = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    if not matching:
        raise FinCompressError(f"no DVC experiment named {name} in {root}; did `dvc exp run` succeed?")

    def metrics(stage: str) -> dict[str, Any]:
        shown = subprocess.run(["git", "show", f"{matching[-1]}:{metrics_dir}/{stage}.json"], cwd=root,
                               capture_output=True, text=True, check=True).stdout
        return json.loads(shown)

    member_f1 = metrics("export_onnx")[member]["test_macro_f1"]
    teacher_f1 = metrics("train_teacher")["test_macro_f1"]
    return {"macro_f1": member_f1, "teacher_macro_f1": teacher_f1, "retention": member_f1 / teacher_f1}


def record_test_metrics(out: Path, summary: dict[str, Any], test: dict[str, float]) -> None:
    built = to_build(summary)
    if built is None:
        raise FinCompressError("the search has no answer to record test figures for")
    built["test"] = test
    write_summary(summary, out)


# --------------------------------------------------------------------------- the whole search


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
                params_tree=_tree(params), root=str(params.root), storage=str(storage), study=name,
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
