"""Compress to a goal (pipeline/orchestration/search/, scripts/search.py): the space and its mapping onto params, the
goal and stopping logic, the Pareto front and the closest-goal answer, and a tiny real search (Optuna,
the compression stages, the latency harness) that never reads the test split and resumes from its
storage."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
import yaml

from pipeline.config import ConfigError, Params, SearchConfig, SearchGoals, load_params, params_from_dict
from pipeline.data import prepared as prepared_module
from pipeline.errors import GateError
from pipeline.evaluation.family import EXCLUDED_FILE
from pipeline.io import write_json
from pipeline.orchestration.search.answer import exp_command
from pipeline.orchestration.search.goals import (
    Outcome,
    closest,
    meets_goals,
    pareto_front,
    stop_reason,
    trials_without_improvement,
)
from pipeline.orchestration.search.space import check_space, overrides_for, suggest, with_overrides
from pipeline.orchestration.search.study import ONNX_DIR, make_sampler, measure_trial, worker_seed
from tests.helpers import copy_project


def outcome(number, retention=0.99, latency=1.0, size=5.0, f1=None, state="COMPLETE"):
    return Outcome(number, state, retention, latency, size, f1 if f1 is not None or retention is None else retention * 0.8)


GOALS = SearchGoals(min_retention=0.98, max_latency_ms=2.0, max_size_mb=None)


# --------------------------------------------------------------------------- the space


def test_space_values_map_onto_existing_params_keys():
    params = Params()
    values = {"num_layers": 2, "init": "teacher", "heads_ratio": 0.25, "ffn_ratio": 0.5, "vocab": "auto",
              "vocab_keep_top": 500, "quantization": "static", "kd_method": "intermediate", "alpha": 0.6, "temperature": 2.0,
              "hidden_weight": 0.5, "attention_weight": 5.0}
    overrides = overrides_for(values, params)
    assert overrides == {
        "student.num_layers": 2, "student.init": "teacher", "prune.heads_ratio": 0.25, "prune.ffn_ratio": 0.5,
        "prune.vocab": "auto", "prune.vocab_keep_top": 500, "export_onnx.quantization": "static",
        "prune.source": "models/student_intermediate", "distill_intermediate.alpha": 0.6,
        "distill_intermediate.temperature": 2.0, "distill_intermediate.hidden_weight": 0.5,
        "distill_intermediate.attention_weight": 5.0,
    }
    built = with_overrides(params, overrides)  # every key exists and every value validates
    assert built.distill_intermediate.alpha == 0.6 and built.prune.source == "models/student_intermediate"
    baseline = overrides_for({**values, "kd_method": "baseline"}, params)
    assert baseline["prune.source"] == "models/student_baseline"
    assert not any(key.startswith("distill_") for key in baseline)  # the baseline reads no KD weight
    command = exp_command("s-winner", {"student.num_layers": 2, "export_onnx.quantization": "static"}, ["data.source=csv"])
    assert command == ["dvc", "exp", "run", "--name", "s-winner", "-S", "student.num_layers=2",
                       "-S", "export_onnx.quantization=static", "-S", "data.source=csv"]


def test_parallel_workers_and_resumed_searches_sample_their_own_configurations():
    """Workers seeded alike proposed the same configuration side by side (both built it); each worker
    now has its own stream, and worker 0 of a new study keeps search.seed (reproducible alone)."""
    cfg = Params().search
    assert worker_seed(cfg, 0, 0) == cfg.seed
    assert len({worker_seed(cfg, 0, 0), worker_seed(cfg, 1, 0), worker_seed(cfg, 0, 2), worker_seed(cfg, 1, 2)}) == 4

    def first_proposals(seed):
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=make_sampler(cfg, seed))
        return [suggest(study.ask(), cfg.space) for _ in range(3)]

    assert first_proposals(worker_seed(cfg, 0, 0)) == first_proposals(cfg.seed)
    assert first_proposals(worker_seed(cfg, 0, 0)) != first_proposals(worker_seed(cfg, 1, 0))


def test_suggest_fixed_values_and_kd_weights_only_where_read():
    space = SearchConfig().space  # the shipped space
    vanilla = suggest(optuna.trial.FixedTrial(
        {"num_layers": 2, "heads_ratio": 0.25, "ffn_ratio": 0.625, "quantization": "dynamic",
         "kd_method": "vanilla", "alpha": 0.5, "temperature": 4.0}), space)
    assert vanilla["init"] == "teacher" and vanilla["vocab_keep_top"] == 2000  # fixed: as given
    assert vanilla["vocab"] == "none"  # as prune's default: no trial trims unless the space says so
    assert vanilla["alpha"] == 0.5 and "hidden_weight" not in vanilla
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        values = suggest(study.ask(), space)
        assert values["num_layers"] in (2, 3) and isinstance(values["num_layers"], int)
        assert values["heads_ratio"] in (0.0, 0.25, 0.5) and 0.5 <= values["ffn_ratio"] <= 0.75
        assert values["kd_method"] in ("vanilla", "intermediate")


@pytest.mark.parametrize(
    "space, message",
    [
        ({"heads_ratio": {"low": 0.5, "high": 0.25}}, "low < high"),
        ({"num_layers": {"low": 1, "high": 3, "step": 0.5}}, "integer dimension"),
        ({"kd_method": {"choices": ["vanilla", "tinybert"]}}, "choose from"),
        ({"vocab_keep_top": {"choices": [0, 2000]}}, "vocab_keep_top varies but vocab is none"),
        ({"quantization": "both"}, "choose from"),
        ({"alpha": {"choices": []}}, "at least 1 item"),
        ({"depth": 3}, "unknown key"),
    ],
)
def test_bad_space_is_a_clear_error(tmp_path, space, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"search": {"space": space}}))
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert "search.space" in str(error.value) and message in str(error.value)


def test_space_values_outside_the_params_ranges_fail_before_any_trial():
    params = params_from_dict({"search": {"space": {"heads_ratio": {"low": 0.5, "high": 1.0}}}})
    with pytest.raises(ConfigError, match=r"search.space.heads_ratio: the value 1.0 is not valid for prune.heads_ratio"):
        check_space(params)
    params = params_from_dict({"search": {"space": {"kd_method": "vanilla", "alpha": {"choices": [0.5, 1.5]}}}})
    with pytest.raises(ConfigError, match="distill_vanilla.alpha"):
        check_space(params)
    check_space(Params())  # the shipped space is valid


# --------------------------------------------------------------------------- goals and stopping


def test_goals_and_patience():
    assert meets_goals(outcome(0, 0.99, 1.5), GOALS)
    assert not meets_goals(outcome(0, 0.97, 1.5), GOALS) and not meets_goals(outcome(0, 0.99, 2.5), GOALS)
    assert not meets_goals(outcome(0, state="FAIL", latency=None), GOALS)
    cfg = SearchConfig(goals=GOALS, patience=2, budget={"trials": 10, "minutes": 60})
    history = [outcome(0, 0.90, 1.0), outcome(1, 0.99, 1.5)]  # trial 1 is the first to meet the goals
    assert trials_without_improvement(history[:1], GOALS) is None  # patience counts only after a success
    assert trials_without_improvement(history, GOALS) == 0
    history.append(outcome(2, 0.99, 1.5, size=4.0))  # as fast and smaller: an improvement
    history.append(outcome(3, 0.995, 1.6))  # better F1 but slower: not an improvement
    assert trials_without_improvement(history, GOALS) == 1
    assert stop_reason(history, 4, cfg, 600, 60) is None
    history.append(outcome(4, state="FAIL", retention=None, latency=None))
    assert "patience" in stop_reason(history, 5, cfg, 600, 60)
    history.append(outcome(5, 0.99, 1.2))  # strictly faster resets it
    assert trials_without_improvement(history, GOALS) == 0
    assert "trial budget" in stop_reason([], 10, cfg, 600, None)
    assert "time budget used" in stop_reason([], 0, cfg, 0, None)
    assert "a trial takes about" in stop_reason([], 1, cfg, 100, 300)


def test_pareto_front_and_closest_goal():
    trials = [
        outcome(0, retention=0.95, latency=1.0, size=5.0, f1=0.80),
        outcome(1, retention=0.982, latency=3.0, size=9.0, f1=0.83),
        outcome(2, retention=0.94, latency=1.2, size=6.0, f1=0.79),  # dominated by trial 0
        outcome(3, retention=0.97, latency=2.2, size=4.0, f1=0.82),
        outcome(4, state="FAIL", retention=None, latency=None, size=None),
    ]
    trials[2] = Outcome(2, "COMPLETE", 0.94, 1.2, 6.0, 0.79)
    assert pareto_front(trials) == [0, 1, 3]
    goals = SearchGoals(min_retention=0.99, max_latency_ms=2.0, max_size_mb=None)
    near = closest(trials, goals)
    assert near["per_goal"]["min_retention"]["trial"] == 1
    assert near["per_goal"]["min_retention"]["text"] == "retention 0.982, 0.008 short of 0.99"
    assert near["per_goal"]["max_latency_ms"]["text"] == "p50 1.000 ms, meets 2 ms"
    # Trial 3: 0.02/0.99 + 0.2/2.0 = 0.120; trial 0: 0.04/0.99 = 0.040; trial 1: 0.008/0.99 + 0.5 = 0.508.
    assert near["overall"]["trial"] == 0
    assert closest([trials[4]], goals) == {}


def test_a_trial_whose_int8_model_failed_its_gate_fails_with_the_gates_reason(tiny_params, tmp_path):
    """export_onnx leaves a member that fails its parity gate out (EXCLUDED.json, no model): the trial
    fails saying so, not that a record is missing (seen with static INT8 on the demo)."""
    trial = tmp_path / "trial-0"
    (trial / ONNX_DIR / "int8_static").mkdir(parents=True)
    reason = "failed its parity gate on validation: label agreement 0.9000 is below 0.98"
    write_json(trial / ONNX_DIR / "int8_static" / EXCLUDED_FILE, {"reason": reason})
    with pytest.raises(GateError, match=f"export_onnx left out the trial's static INT8 model: {reason}"):
        measure_trial(tiny_params, {"quantization": "static"}, trial, 0)


# --------------------------------------------------------------------------- a tiny real search


TINY_SPACE = {
    "num_layers": 1, "init": "teacher", "heads_ratio": {"choices": [0.0, 0.5]}, "ffn_ratio": 0.5,
    "vocab": "auto", "vocab_keep_top": 5, "quantization": {"choices": ["dynamic", "static"]},
    "kd_method": {"choices": ["baseline", "vanilla"]}, "alpha": 0.7, "temperature": 2.0,
}
TINY_SEARCH = {
    "goals": {"min_retention": 0.01, "max_latency_ms": 1000.0, "max_size_mb": None},
    "budget": {"trials": 1, "minutes": 10}, "patience": 5, "seed": 0,
    "latency": {"min_runs": 5, "min_seconds": 0.0, "warmup_runs": 1, "rounds": 1},
    "space": TINY_SPACE,
}


@pytest.fixture
def search_project(trained_project, tmp_path):
    """A copy of the trained tiny project whose prepared test split is GONE: a search that touched it
    anywhere would fail."""
    params = copy_project(trained_project, tmp_path, search=TINY_SEARCH)
    (tmp_path / "data" / "prepared" / "test.jsonl").unlink()
    return params


@pytest.mark.dask_cluster
def test_tiny_search_never_reads_test_writes_the_answer_and_resumes(search_project, tmp_path, monkeypatch):
    import mlflow

    from pipeline.orchestration.search.runner import run_search
    from pipeline.orchestration.search.space import study_name
    from pipeline.orchestration.search.study import open_study
    from scripts.search import compress

    read_splits = []
    real_load_split = prepared_module.load_split
    monkeypatch.setattr(prepared_module, "load_split",
                        lambda directory, split: read_splits.append(split) or real_load_split(directory, split))
    storage = tmp_path / "search.db"

    first = run_search(search_project, compress, storage=storage)
    assert first["used"]["trials"] == 1 and first["used"]["complete"] == 1, first
    assert first["winner"]["trial"] == 0

    # A search killed mid-trial leaves a RUNNING trial; the resumed one fails it and goes on to 3 in all.
    name = study_name(search_project)
    open_study(search_project, storage, name).ask()
    resumed_params = with_overrides(search_project, {"search.budget.trials": 3})
    assert study_name(resumed_params) == name  # the budget is not part of the study's identity
    summary = run_search(resumed_params, compress, storage=storage, jobs=2)
    trials = open_study(search_project, storage, name).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    # The goals are the trials' Optuna constraints (the samplers steer by them): met, so <= 0.
    assert all(set(t.constraints) == {"min_retention", "max_latency_ms"} and max(t.constraints.values()) <= 0
               for t in trials if t.state.name == "COMPLETE")
    assert summary["used"] == {**summary["used"], "trials": 3, "complete": 2, "failed": 1}

    assert "test" not in read_splits and "validation" in read_splits and "train" in read_splits

    out = tmp_path / "reports" / "search"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [row["state"] for row in rows] == states
    assert all(float(row["validation_macro_f1"]) > 0 and float(row["latency_ms_p50"]) > 0
               for row in rows if row["state"] == "COMPLETE")
    assert (out / "pareto.png").stat().st_size > 10_000
    winner = summary["winner"]
    assert winner is not None and yaml.safe_load((out / "winner.yaml").read_text()) == winner["overrides"]
    assert winner["overrides"]["student.num_layers"] == 1 and winner["dvc_exp_run"].startswith("dvc exp run --name")
    assert winner["retention"] == pytest.approx(winner["validation_macro_f1"] / summary["teacher_validation_macro_f1"])
    assert str(winner["trial"]) in summary["remeasured_p50_ms"]  # the candidates were re-timed side by side
    assert json.loads((out / "summary.json").read_text())["winner"]["trial"] == winner["trial"]
    assert "Winner: trial" in (out / "summary.md").read_text()

    # MLflow: one run per search invocation, each trial a nested child run with its state.
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(search_project.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.search_study = '{name}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 2
    assert {r.data.tags["state"] for r in children} == {"COMPLETE"}
    assert all(r.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents} for r in children)
    assert all("validation_macro_f1" in r.data.metrics and "latency_ms_p50" in r.data.metrics for r in children)


@pytest.mark.dask_cluster
def test_failing_trials_are_recorded_and_the_closest_goal_reported(search_project, tmp_path):
    from dask.distributed import LocalCluster

    from pipeline.orchestration.search.runner import run_search
    from pipeline.orchestration.search.space import study_name
    from pipeline.orchestration.search.study import open_study
    from scripts.search import compress

    # An impossible retention goal; the first trial cannot be built (a 9-layer student of the 2-layer
    # tiny teacher is a ConfigError in the student stage), the second completes but misses the goal.
    # The worker runs on a (local) Dask cluster, as --dask-address does.
    params = with_overrides(search_project, {
        "search.goals.min_retention": 1.5, "search.budget.trials": 2,
        "search.space.num_layers": {"choices": [1, 9]}, "search.study": "too-deep",
    })
    storage = tmp_path / "search.db"
    study = open_study(params, storage, study_name(params))
    study.enqueue_trial({"num_layers": 9})
    study.enqueue_trial({"num_layers": 1})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary = run_search(params, compress, storage=storage, dask_address=cluster.scheduler_address)
    out = tmp_path / "reports" / "search"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [row["state"] for row in rows] == ["FAIL", "COMPLETE"]
    assert "num_layers=9 is deeper" in rows[0]["error"]
    assert summary["winner"] is None and not (out / "winner.yaml").exists()
    assert summary["closest"]["overall"]["trial"] == 1
    assert "short of 1.5" in summary["closest"]["per_goal"]["min_retention"]["text"]
    text = (out / "summary.md").read_text()
    assert "No trial meets every goal" in text
    # No winner: the closest trial is the answer --build-winner rebuilds, with its own experiment name.
    nearest = summary["closest"]["overall"]["answer"]
    assert nearest["trial"] == 1 and nearest["overrides"]["student.num_layers"] == 1
    assert nearest["dvc_exp_name"].endswith("-closest") and nearest["dvc_exp_run"] in text


def test_winner_test_metrics_are_read_from_the_experiment(tmp_path):
    """--build-winner reads the test figures from the DVC experiment's commit (refs/exps/..../<name>)."""
    import subprocess

    from pipeline.errors import FinCompressError
    from pipeline.orchestration.search.answer import read_exp_test_metrics

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**__import__("os").environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"})

    metrics = tmp_path / "reports" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "export_onnx.json").write_text(json.dumps({"student_onnx_int8_static": {"test_macro_f1": 0.8}}))
    (metrics / "train_teacher.json").write_text(json.dumps({"test_macro_f1": 0.9}))
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "experiment")
    git("update-ref", "refs/exps/ab/cdef0123/search-x-winner", "HEAD")  # where `dvc exp run --name` keeps it
    found = read_exp_test_metrics(tmp_path, "search-x-winner", "student_onnx_int8_static")
    assert found == {"macro_f1": 0.8, "teacher_macro_f1": 0.9, "retention": pytest.approx(0.8 / 0.9)}
    with pytest.raises(FinCompressError, match="no DVC experiment named other"):
        read_exp_test_metrics(tmp_path, "other", "student_onnx_int8")

    from pipeline.orchestration.search.answer import record_test_metrics

    summary = {
        "study": "search-x", "goals": {"min_retention": 0.98, "max_latency_ms": 2.0, "max_size_mb": None},
        "budget": {"trials": 6, "minutes": 15}, "used": {"trials": 3, "complete": 3, "failed": 0, "minutes_this_run": 9.5},
        "stopped_because": "patience: 3 trials without a faster model meeting the goals",
        "teacher_validation_macro_f1": 0.8, "winner": {
            "trial": 2, "member": "student_onnx_int8_static", "validation_macro_f1": 0.79, "retention": 0.9875,
            "latency_ms_p50": 0.61, "size_mb": 4.2, "overrides": {"student.num_layers": 2},
            "dvc_exp_name": "search-x-winner", "dvc_exp_run": "dvc exp run --name search-x-winner -S student.num_layers=2",
        },
    }
    record_test_metrics(tmp_path, summary, found)
    text = (tmp_path / "summary.md").read_text()
    assert "Winner: trial 2 (student_onnx_int8_static)" in text and "`student.num_layers=2`" in text
    assert "Test split, read once after the search (experiment search-x-winner): macro-F1 0.8000" in text
    assert json.loads((tmp_path / "summary.json").read_text())["winner"]["test"]["macro_f1"] == 0.8

    # Without a winner the closest trial's test figures are recorded under its answer.
    nearest = dict(summary["winner"], dvc_exp_name="search-x-closest")
    summary.update(winner=None, closest={"per_goal": {}, "overall": {"trial": 2, "gaps": ["p50 0.610 ms, 0.110 ms over 0.5 ms"], "answer": nearest}})
    record_test_metrics(tmp_path, summary, found)
    text = (tmp_path / "summary.md").read_text()
    assert "No trial meets every goal" in text and "Rebuild it (it does not meet every goal)" in text
    assert "Test split, read once after the search (experiment search-x-closest): macro-F1 0.8000" in text


def test_a_trial_that_raises_is_recorded_as_failed_and_the_search_goes_on(search_project, tmp_path):
    """Any error inside a trial (here the stages raise a failed gate) fails that trial only: Optuna FAIL,
    its MLflow child run FAILED with the message, the search's run FINISHED, and an answer written."""
    import mlflow

    from pipeline.errors import GateError
    from pipeline.orchestration.search.runner import run_search
    from pipeline.orchestration.search.space import study_name

    def gate_fails(params, kd_method):
        raise GateError("ONNX parity failed over the validation split: student ONNX INT8 (validation): ...")

    params = with_overrides(search_project, {"search.budget.trials": 2, "search.study": "gate-fails"})
    summary = run_search(params, gate_fails, storage=tmp_path / "search.db")
    assert summary["used"]["failed"] == 2 and summary["winner"] is None and summary["closest"] == {}
    assert "no trial completed" in (tmp_path / "reports" / "search" / "summary.md").read_text()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.search_study = '{study_name(params)}'")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in children] == ["FAILED", "FAILED"] and parent.info.status == "FINISHED"
    assert all(r.data.tags["state"] == "FAIL" and "ONNX parity failed" in r.data.tags["error"] for r in children)


def test_a_worker_process_that_dies_does_not_hang_the_search(search_project, tmp_path):
    """`--jobs 2`: worker processes killed mid-trial (as by the OOM killer) are replaced; the trials
    they were running are recorded as failed, the budget holds, and the search ends with an answer
    instead of waiting forever for a lost worker."""
    from pipeline.orchestration.search.runner import run_search
    from pipeline.orchestration.search.space import study_name
    from pipeline.orchestration.search.study import open_study
    from tests.helpers import compress_that_kills_its_process

    params = with_overrides(search_project, {"search.budget.trials": 2, "search.study": "worker-dies"})
    storage = tmp_path / "search.db"
    summary = run_search(params, compress_that_kills_its_process, storage=storage, jobs=2)
    assert [t.state.name for t in open_study(params, storage, study_name(params)).trials] == ["FAIL", "FAIL"]
    assert summary["used"]["failed"] == 2 and summary["winner"] is None
