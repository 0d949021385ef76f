"""The answer of a search: its trials as rows, the closest trials re-measured, the summary with the
`dvc exp run` command that rebuilds the winner, and the winner's test figures once it is built."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params
from pipeline.config.search import SearchGoals
from pipeline.errors import FinCompressError
from pipeline.io import write_json, write_text_atomic
from pipeline.orchestration.search.goals import Outcome, closest, meets_goals, pareto_front
from pipeline.orchestration.search.space import overrides_for
from pipeline.orchestration.search.study import outcome_of, view_dir


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
    workers trained are noisy), timed as the benchmark stage times a member (until its p50 is stable)."""
    from pipeline.data.prepared import load_prepared
    from pipeline.evaluation.family import MEMBER_KINDS
    from pipeline.evaluation.latency import one_thread_latency, quiet_machine
    from pipeline.evaluation.stopping import benchmark_stopping

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
        timing = one_thread_latency(members, view.texts("validation"), params.task.max_length, cfg.min_runs, 0.0,
                                    cfg.warmup_runs, cfg.min_rounds, cfg.seed, stopping=benchmark_stopping(cfg))
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
