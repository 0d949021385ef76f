"""Bootstrap intervals, the Pareto front, the champion choice and the report stage on a hand-made family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.config import SLAConfig, params_from_dict
from pipeline.evaluation.family import family
from pipeline.evaluation.latency import all_cores_layouts
from pipeline.evaluation.metrics import (
    bootstrap_ci,
    macro_f1,
    paired_bootstrap_difference,
    resampled_macro_f1,
)
from pipeline.evaluation.plots import label_members, loss_columns, loss_curves_plot, read_curve, read_phases
from pipeline.evaluation.record import ModelRecord
from pipeline.evaluation.report import (
    closest_member,
    markdown_table,
    no_champion_message,
    pareto_front,
    pick_champion,
)
from pipeline.not_built import mark_not_built
from scripts.first_screen import first_screen
from stages import report
from tests.helpers import export_tiny_classifier


def test_bootstrap_interval_on_a_known_case():
    # 80% accuracy on 400 examples: the normal approximation gives 0.80 +- 1.96 * sqrt(0.16 / 400).
    y_true = np.ones(400, dtype=int)
    y_pred = np.r_[np.ones(320, dtype=int), np.zeros(80, dtype=int)]
    low, high = bootstrap_ci(y_true, y_pred, lambda t, p: float((t == p).mean()), samples=2000, seed=1)
    half_width = 1.96 * np.sqrt(0.8 * 0.2 / 400)
    assert low == pytest.approx(0.8 - half_width, abs=0.01)
    assert high == pytest.approx(0.8 + half_width, abs=0.01)
    assert bootstrap_ci(y_true, y_true, lambda t, p: float((t == p).mean()), samples=50) == (1.0, 1.0)


@pytest.mark.parametrize("labels", [1, 3, 6])
def test_vectorized_macro_f1_matches_scikit_learn_on_every_resample(labels):
    # The bootstrap's vectorized macro-F1 against scikit-learn's, one resample at a time: classes missing
    # from a resample (single-label: left out of the mean), labels never true nor predicted (multi-label:
    # zero), one indicator column (scikit-learn reads it as single-label).
    rng = np.random.default_rng(labels)
    for n in (5, 40, 113):
        index = rng.integers(0, n, (40, n))
        y_true = rng.integers(0, 4, n)
        y_true[: n // 2] = 0  # rare classes drop out of many resamples
        y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, 4, n))
        indicator_true = (rng.random((n, labels)) < 0.3).astype(int)
        indicator_pred = np.where(rng.random((n, labels)) < 0.8, indicator_true, 1 - indicator_true)
        indicator_true[:, 0] = indicator_pred[:, 0] = 0
        for truth, predicted in ((y_true, y_pred), (indicator_true, indicator_pred)):
            expected = [macro_f1(truth[rows], predicted[rows]) for rows in index]
            assert resampled_macro_f1(truth, predicted, index) == pytest.approx(expected)


def test_default_bootstrap_is_the_scikit_learn_interval():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 113)
    y_pred = np.where(rng.random(113) < 0.8, y_true, rng.integers(0, 3, 113))
    assert bootstrap_ci(y_true, y_pred, samples=300) == pytest.approx(bootstrap_ci(y_true, y_pred, macro_f1, samples=300))


def test_paired_bootstrap_interval_of_a_difference():
    """macro-F1(a) - macro-F1(b) with both scored on the same resamples (by hand with scikit-learn):
    two models that differ on two of 113 examples get an interval far narrower than either one's own."""
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 113)
    a = np.where(rng.random(113) < 0.8, y_true, rng.integers(0, 3, 113))
    b = a.copy()
    flipped = np.flatnonzero(a == y_true)[:2]  # b gets two of a's right answers wrong
    b[flipped] = (y_true[flipped] + 1) % 3
    low, high = paired_bootstrap_difference(y_true, a, b, samples=300, seed=5)
    index = np.random.default_rng(5).integers(0, 113, (300, 113))
    by_hand = [macro_f1(y_true[rows], a[rows]) - macro_f1(y_true[rows], b[rows]) for rows in index]
    assert (low, high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])))
    assert 0 <= low < high < 0.05
    own_low, own_high = bootstrap_ci(y_true, b, samples=300, seed=5)
    assert high - low < (own_high - own_low) / 2
    assert paired_bootstrap_difference(y_true, a, a, samples=50) == (0.0, 0.0)


def row(name, latency, f1, fmt="onnx", size=10.0, retention=None, validation=None):
    validation = validation if validation is not None else f1
    return {"name": name, "format": fmt, "precision": "fp32", "servable": fmt == "onnx", "latency_ms_p50": latency,
            "test_macro_f1": f1, "f1_retention": retention if retention is not None else f1 / 0.95, "size_mb": size,
            "validation_macro_f1": validation, "validation_f1_retention": validation / 0.95}


def test_pareto_front_on_a_hand_made_family():
    rows = [row("teacher", 60, 0.95, "torch"), row("slow_bad", 70, 0.90), row("mid", 10, 0.93),
            row("mid_worse", 12, 0.92), row("fast", 1, 0.90), row("fast_tie", 1, 0.89), row("same_as_mid", 10, 0.93)]
    assert pareto_front(rows) == ["fast", "mid", "same_as_mid", "teacher"]


def test_labels_of_members_on_almost_the_same_point_do_not_overlap():
    import matplotlib.pyplot as plt

    rows = [row("student_baseline", 5.60, 0.913), row("student_vanilla", 5.74, 0.899),
            row("student_intermediate", 5.73, 0.918), row("teacher_onnx", 8.3, 0.915), row("teacher", 12.6, 0.915)]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    ax.scatter([r["latency_ms_p50"] for r in rows], [r["test_macro_f1"] for r in rows])
    ax.set_xscale("log")
    ax.set_ylim(0.85, 0.98)  # as wide as the confidence intervals make it in a real report
    label_members(ax, rows, front=[])
    fig.canvas.draw()
    boxes = [text.get_window_extent() for text in ax.texts]
    plt.close(fig)
    assert len(boxes) == len(rows)
    overlapping = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert overlapping == []


def test_champion_is_the_fastest_servable_member_within_the_sla_judged_on_validation():
    rows = [row("teacher", 60, 0.95, "torch"), row("torch_fast", 0.5, 0.95, "torch"),
            row("onnx_a", 1.5, 0.94, validation=0.93), row("onnx_b", 0.8, 0.95, validation=0.80),
            row("onnx_c", 1.2, 0.90, validation=0.92), row("onnx_slow", 9, 0.96)]
    before = [dict(r) for r in rows]
    champion, note = pick_champion(rows, SLAConfig(max_latency_ms=2, min_f1_retention=0.95))
    # onnx_b is faster but fails on validation (its good test F1 must not matter); torch_fast is not servable.
    assert champion["name"] == "onnx_c" and "fastest of the 2 servable members" in note
    assert rows == before, "the rows are not changed"


def test_no_champion_says_why():
    rows = [row("teacher", 60, 0.95, "torch"), row("onnx_a", 1.5, 0.94, validation=0.93),
            row("onnx_b", 0.8, 0.95, validation=0.80)]
    champion, note = pick_champion(rows, SLAConfig(max_latency_ms=0.5, min_f1_retention=0.95))
    assert champion is None and "nothing was registered" in note
    # What the members meeting one half of the SLA miss of the other: onnx_a keeps the retention at 1.5 ms,
    # and nothing is within 0.5 ms.
    assert "the fastest keeping the retention, onnx_a, has p50 1.50 ms; none has p50 <= 0.5 ms" in note
    champion, note = pick_champion(rows, SLAConfig(max_latency_ms=1, min_f1_retention=0.99))
    assert "none keeps a validation F1 retention of 0.99; the best retention within 1.0 ms, onnx_b's, is 0.842" in note
    champion, note = pick_champion(rows[:1], SLAConfig(max_latency_ms=100, min_f1_retention=0.5))
    assert champion is None and "no servable member was benchmarked" in note


def test_the_closest_member_to_the_sla_and_the_search_that_may_close_the_gap():
    # onnx_fast misses retention by 0.05 / 0.95 (5%); onnx_slow misses latency by 8 / 2 (400%).
    rows = [row("teacher", 60, 0.95, "torch"), row("torch_fast", 0.5, 0.95, "torch"),
            row("onnx_slow", 10, 0.95), row("onnx_fast", 0.8, 0.95, validation=0.9)]
    sla = SLAConfig(max_latency_ms=2, min_f1_retention=1.0)
    near = closest_member(rows, sla)
    assert near["member"] == "onnx_fast", "torch_fast is not servable"
    assert near["distance"] == {"min_f1_retention": pytest.approx(1 - 0.9 / 0.95), "max_latency_ms": 0.0}
    message = no_champion_message(near, sla)
    assert "Closest: onnx_fast (validation retention 0.947, 0.053 short of 1; p50 0.800 ms, meets 2 ms)" in message
    assert message.endswith('make search SEARCH_ARGS="search.goals.min_retention=1 search.goals.max_latency_ms=2"')
    assert closest_member(rows[:2], sla) is None
    assert "export the ONNX models" in no_champion_message(None, sla)
    # An SLA that asks no retention (0) is a latency goal alone, for the search too.
    loose = SLAConfig(max_latency_ms=0.5, min_f1_retention=0.0)
    near = closest_member(rows, loose)
    assert near["member"] == "onnx_fast" and near["distance"]["min_f1_retention"] == 0.0
    assert no_champion_message(near, loose).endswith(
        'make search SEARCH_ARGS="search.goals.min_retention=null search.goals.max_latency_ms=0.5"')


def test_a_p50_whose_interval_straddles_the_sla_says_a_rerun_may_decide_otherwise():
    # The demo's INT8 member on an AVX2 CPU: 1.95 ms in one benchmark run (champion), 2.00 in the next (none).
    sla = SLAConfig(max_latency_ms=2, min_f1_retention=0.98)
    over = row("onnx", 2.002, 0.95) | {"latency_p50_ci95": [1.936, 2.051]}
    rows = [row("teacher", 60, 0.95, "torch"), over]
    message = no_champion_message(closest_member(rows, sla), sla)
    assert "Its p50's 95% interval, [1.94, 2.05] ms, reaches under 2 ms" in message
    assert "dvc repro -f -s benchmark" in message
    under = over | {"latency_ms_p50": 1.946}
    champion, note = pick_champion([rows[0], under], sla)
    assert champion["name"] == "onnx" and "[1.94, 2.05] ms, reaches over 2 ms: another benchmark run may not" in note
    # Clear of the SLA on its side: nothing said.
    clear = over | {"latency_ms_p50": 2.6, "latency_p50_ci95": [2.5, 2.7]}
    assert "interval" not in no_champion_message(closest_member([rows[0], clear], sla), sla)
    assert "interval" not in pick_champion([rows[0], clear | {"latency_ms_p50": 1.0, "latency_p50_ci95": [0.9, 1.1]}], sla)[1]


def test_loss_curves_draw_every_loss_column(tmp_path):
    path = tmp_path / "curve.csv"
    path.write_text("step,loss_total,loss_ce,loss_contrastive,train_loss,eval_macro_f1\n1,1.0,0.6,0.4,,0.8\n"
                    "2,0.5,0.3,0.2,0.7,0.9\n")
    assert loss_columns(read_curve(path)) == ["loss_total", "loss_ce", "loss_contrastive"]
    path.write_text("step,train_loss,eval_macro_f1\n1,0.9,0.7\n")  # plain fine-tuning logs no loss terms
    assert loss_columns(read_curve(path)) == ["train_loss"]
    # Two-phase KD: the curve's text column `phase` is not a number; the plot marks where phase 2 starts.
    path.write_text("step,loss_hidden,loss_total,phase,eval_macro_f1\n1,0.2,0.2,layers,\n2,,0.6,logits,0.8\n")
    assert read_phases(path) == ["layers", "logits"] and "phase" not in read_curve(path)[0]
    loss_curves_plot({"distill_intermediate": path}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_markdown_marks_best_values():
    table = markdown_table([
        {**row("a", 1.0, 0.9), "num_parameters": 1e6, "test_macro_f1_ci95": [0.8, 0.95]},
        {**row("b", 2.0, 0.95), "num_parameters": 2e6, "test_macro_f1_ci95": [0.9, 0.99]},
    ])
    assert "**0.950**" in table and "**1.000**" in table and "[0.800, 0.950]" in table


LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def onnx_dir(tiny_bert, tmp_path_factory):
    """A real exported classifier: the champion is registered as a text-in model over it."""
    return export_tiny_classifier(tiny_bert, tmp_path_factory.mktemp("report_onnx"), LABELS)


def hand_made_family(tmp_path, onnx_dir, report_params=None, not_built=()):
    report_params = report_params or {"sla": {"max_latency_ms": 5.0, "min_f1_retention": 0.9}}
    params = params_from_dict({"report": report_params}, root=tmp_path)
    figures = {  # name: (test F1, p50 ms, size MB)
        "teacher": (0.95, 60.0, 90.0), "teacher_onnx": (0.95, 40.0, 90.0), "student_baseline": (0.88, 9.0, 69.0),
        "student_vanilla": (0.90, 9.1, 69.0), "student_intermediate": (0.92, 9.2, 69.0),
        "student_pruned": (0.92, 5.0, 25.0), "student_int8_torch": (0.91, 4.0, 12.0),
        "student_onnx_fp32": (0.92, 2.0, 25.0), "student_onnx_int8": (0.915, 0.9, 6.5),
        "student_onnx_int8_static": (0.915, 1.1, 6.6),
        "tfidf": (0.85, 2.5, 1.1), "static": (0.80, 0.2, 2.3),  # the reference members
    }
    entries = []
    for member in family(params):
        if member.name in not_built:  # its stage was switched off: the benchmark left it out
            mark_not_built(member.path, f"{member.name} was switched off")
            continue
        f1, latency, size = figures[member.name]
        member.path.mkdir(parents=True)
        if member.format == "onnx":
            shutil.copytree(onnx_dir, member.path, dirs_exist_ok=True)
        record = ModelRecord(
            member=member.name, stage="hand-made", label_names=LABELS, task_type="single_label",
            max_length=32, num_parameters=int(size * 250_000), size_mb=size, data_hash="0",
            test={"macro_f1": f1, "macro_f1_ci95": [f1 - 0.02, f1 + 0.02], "accuracy": f1 + 0.02,
                  "per_class_f1": dict(zip(LABELS, (f1 - 0.1, f1, f1 + 0.05))), "examples": 40},
            validation={"macro_f1": f1 - 0.01},
        )
        record.write(member.path)
        timing = {t: {"p50": latency / (2 if t == "2" else 1), "p95": latency * 1.2, "p99": latency * 1.5, "runs": 40,
                      "p50_ci95": [latency * 0.99, latency * 1.01], "stopped": "stable"} for t in ("1", "2")}
        entries.append({"name": member.name, "format": member.format, "precision": member.precision,
                        "servable": member.servable, "alternative": member.alternative,
                        "size_mb": size, "num_parameters": record.num_parameters, "latency_ms": timing,
                        "e2e_latency_ms": timing, "throughput_per_second": {"1": 1000 / latency, "2": 1800 / latency},
                        "peak_rss_mb": 100 + size, "speedup_vs_teacher": {"1": 60 / latency, "2": 60 / latency}})
        if member.parallel_sessions:  # ONNX: the static INT8 member serves best as 2 one-thread sessions
            sessions = 2100 / latency if member.name == "student_onnx_int8_static" else 1500 / latency
            entries[-1]["all_cores_throughput"] = all_cores_layouts(2, 1800 / latency, sessions)
    benchmark = {"machine": {"cpu": "Test CPU", "cores": 2, "machine": "x86_64", "python": "3.11", "onnxruntime": "1",
                             "load": {"other_work_cores_before": 1.25, "load_average_before": [0.4, 0.3, 0.2], "busy": True}},
                 "settings": {"thread_counts": ["1", "2"], "test_sentences": 10, "max_length": 32, "min_runs": 5,
                              "rel_ci": 0.02, "min_rounds": 1, "max_runs": 50, "max_seconds": 1.0,
                              "throughput_batch_size": 4},
                 "reference": "teacher", "members": entries}
    path = params.path(params.paths.benchmark)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(benchmark))
    manifest = {"task_type": "single_label", "label_names": LABELS, "source": "data/tiny.csv", "seed": 0,
                "splits": {"train": {"rows": 120}, "validation": {"rows": 40}, "test": {"rows": 40}}}
    params.path(params.paths.prepared).mkdir(parents=True)
    (params.path(params.paths.prepared) / "manifest.json").write_text(json.dumps(manifest))
    curves = params.path(params.paths.curves)
    curves.mkdir(parents=True)
    (curves / "distill_intermediate.csv").write_text(
        "step,loss_total,loss_ce,loss_kl,loss_hidden,loss_attention,eval_macro_f1\n1,1.0,0.5,0.4,0.1,0.01,0.8\n2,0.5,0.2,0.2,0.08,0.009,0.9\n")
    (curves / "student_baseline.csv").write_text("step,loss_total,loss_ce,eval_macro_f1\n1,0.9,0.9,0.7\n2,0.4,0.4,0.85\n")
    return params


def test_report_stage_on_a_hand_made_family(tmp_path, onnx_dir):
    params = hand_made_family(tmp_path, onnx_dir)
    metrics = report.STAGE.execute(params)
    reports = params.path(params.paths.reports)
    rows = json.loads((reports / "family.json").read_text())
    assert [r["name"] for r in rows][0] == "teacher" and len(rows) == 12
    required = {"name", "format", "precision", "num_parameters", "size_mb", "test_macro_f1", "test_macro_f1_ci95",
                "test_accuracy", "f1_retention", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
                "e2e_latency_ms_p50", "throughput_b32", "speedup_vs_teacher", "compression_vs_teacher", "peak_rss_mb"}
    assert required <= set(rows[0])
    int8 = next(r for r in rows if r["name"] == "student_onnx_int8")
    assert int8["champion"] and int8["pareto_optimal"] and int8["servable"]
    assert int8["validation_f1_retention"] == pytest.approx(0.905 / 0.94)
    assert int8["compression_vs_teacher"] == pytest.approx(90 / 6.5)
    markdown = (reports / "comparison.md").read_text()
    assert "Test CPU" in markdown and "**0.200**" in markdown and "student_onnx_int8" in markdown  # static: the fastest
    assert ("Other processes used 1.25 of its cores when the timing started (busy: the timings are likely slower "
            "than on a quiet machine).") in markdown
    assert "- student_onnx_int8: use one session with 2 threads (2000/s; 2 sessions with 1 thread each: 1667/s)." in markdown
    assert "- student_onnx_int8_static: use 2 sessions with 1 thread each (1909/s; one session with 2 threads: 1636/s)" in markdown
    assert "- student_pruned:" not in markdown, "torch members have no side-by-side sessions"
    assert "Runs per member at 1 thread, model only (the p50's 95% interval): teacher 40 (+-1.0%)" in markdown
    # The reference members: marked in the table, and what the champion buys over the best of them.
    assert "| tfidf (reference) |" in markdown and "| static (reference) |" in markdown
    assert ("The champion is +6.5 points of test macro-F1 over the best alternative, tfidf (0.850), at 0.36x its "
            "latency (end-to-end p50 0.90 vs 2.50 ms, 1 thread).") in markdown
    assert metrics["best_alternative"]["name"] == "tfidf"
    assert metrics["best_alternative"]["champion_margin_points"] == pytest.approx(6.5)
    assert int8["serving_layout"] == "one_session_n_threads" and int8["throughput_all_cores_sessions"] == pytest.approx(1500 / 0.9)
    for name in ("pareto.png", "loss_curves.png"):
        assert (reports / name).stat().st_size > 10_000
    assert metrics["student_onnx_int8"]["latency_ms_p50"] == 0.9
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(params.report.registered_model_name, "champion")
    assert version.tags["family_member"] == "student_onnx_int8"
    assert float(version.tags["test_macro_f1"]) == 0.915 and float(version.tags["latency_ms_p50"]) == 0.9
    # The registered card is the complete one: the benchmark's latency and its machine.
    assert version.description.startswith("# student_onnx_int8: FinCompress model card")
    assert "Test CPU" in version.description and "| p50 / p95 / p99, 1 thread (ms) | 0.900 / " in version.description
    champion = mlflow.pyfunc.load_model(f"models:/{params.report.registered_model_name}@champion")
    answer = champion.predict(pd.DataFrame({"text": ["Operating profit rose."]}))
    assert answer["label"].iloc[0] in LABELS and list(answer["probabilities"].iloc[0]) == LABELS
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{params.report.registered_model_name}@champion"))
    assert next(local.glob("artifacts/*/README.md")).read_text() == version.description
    # The report run shows the comparison in the MLflow UI: a table and the plots as images.
    report_run = mlflow.search_runs(experiment_names=[params.tracking.experiment],
                                    filter_string="tags.stage = 'report' AND tags.family_member = ''").iloc[0]
    client = mlflow.MlflowClient()
    table = json.loads(Path(client.download_artifacts(report_run.run_id, "report/comparison_table.json")).read_text())
    assert "student_onnx_int8" in str(table["data"]) and "test_macro_f1" in table["columns"]
    images = [item.path for item in client.list_artifacts(report_run.run_id, "images")]
    assert any("pareto" in path for path in images) and any("loss_curves" in path for path in images)
    children = mlflow.search_runs(experiment_names=[params.tracking.experiment],
                                  filter_string="tags.stage = 'report' AND tags.family_member = 'student_pruned'")
    assert "metrics.latency_ms_p50" in children.columns and children["metrics.latency_ms_p50"].iloc[0] == 5.0
    assert children["tags.reference"].iloc[0] == "false"
    tfidf = mlflow.search_runs(experiment_names=[params.tracking.experiment],
                               filter_string="tags.stage = 'report' AND tags.reference = 'true'")
    assert set(tfidf["tags.family_member"]) == {"tfidf", "static"}


def test_a_student_that_was_not_built_is_listed_with_its_reason(tmp_path, onnx_dir):
    sla = {"max_latency_ms": 5.0, "min_f1_retention": 0.9}
    params = hand_made_family(tmp_path, onnx_dir, {"sla": sla, "registered_model_name": "report-test-not-built"},
                              not_built=("student_intermediate",))
    metrics = report.STAGE.execute(params)
    reports = params.path(params.paths.reports)
    rows = json.loads((reports / "family.json").read_text())
    assert rows[-1] == {"name": "student_intermediate", "excluded": "was not built: student_intermediate was switched off"}
    assert "Left out: student_intermediate was not built: student_intermediate was switched off." in (
        reports / "comparison.md").read_text()
    assert metrics["champion"]["member"] == "student_onnx_int8", "the others are chosen from as before"


def test_report_stage_without_a_champion_says_which_member_is_closest(tmp_path, onnx_dir):
    name = "report-test-no-champion"
    params = hand_made_family(tmp_path, onnx_dir, {"sla": {"max_latency_ms": 0.5, "min_f1_retention": 0.99},
                                                   "registered_model_name": name})
    metrics = report.STAGE.execute(params)
    reports = params.path(params.paths.reports)
    # student_onnx_int8: p50 0.9 ms (0.4 over 0.5, 80%), retention 0.905 / 0.94 (2.7% short of 0.99).
    message = metrics["no_champion"]["message"]
    assert metrics["no_champion"]["closest"]["member"] == "student_onnx_int8" and "champion" not in metrics
    assert "Closest: student_onnx_int8" in message and "p50 0.900 ms, 0.400 ms over 0.5 ms" in message
    assert 'search.goals.min_retention=0.99 search.goals.max_latency_ms=0.5"' in message
    assert message in (reports / "comparison.md").read_text()
    rows = json.loads((reports / "family.json").read_text())
    assert [r["name"] for r in rows if r["closest_to_sla"]] == ["student_onnx_int8"]
    assert not any(r["champion"] for r in rows)
    run = mlflow.search_runs(experiment_names=[params.tracking.experiment], order_by=["start_time DESC"],
                             filter_string="tags.stage = 'report' AND tags.family_member = ''").iloc[0]
    assert run["tags.closest_member"] == "student_onnx_int8" and run["tags.no_champion"] == message
    with pytest.raises(mlflow.exceptions.MlflowException):
        mlflow.MlflowClient().get_model_version_by_alias(name, "champion")


def test_the_first_screen_shows_the_key_rows_and_how_to_serve_the_champion():
    def full(name, latency, f1, fmt="onnx", **flags):
        return {**row(name, latency, f1, fmt), "speedup_vs_teacher": 60 / latency, "champion": False,
                "closest_to_sla": False, **flags}

    rows = [full("teacher", 60, 0.95, "torch"), full("student_onnx_int8", 1.0, 0.94, champion=True),
            full("student_int8_torch", 0.8, 0.90, "torch"), full("student_onnx_fp32", 2.0, 0.94),
            {"name": "student_intermediate", "excluded": "was not built: distill_intermediate.enabled is false"}]
    registered = {"champion": {"member": "student_onnx_int8", "registered_model_name": "fincompress-sentiment",
                               "registry_version": 3}}
    screen = first_screen(rows, registered, 5002, "reports/comparison.md")
    assert len(screen.splitlines()) <= 15 and screen.startswith("The family: 4 members"), "members left out have no figures"
    assert [line.split()[0] for line in screen.splitlines()[3:6]] == ["teacher", "student_onnx_int8", "student_int8_torch"]
    assert "60.00     1.0x" in screen and "champion" in screen.splitlines()[4] and "fastest" in screen.splitlines()[5]
    assert "registered as fincompress-sentiment version 3, alias champion" in screen and "make serve" in screen
    assert "curl -s http://127.0.0.1:5002/invocations" in screen and "student_onnx_fp32" not in screen

    rows[1].update(champion=False, closest_to_sla=True)
    message = "No servable member meets the SLA ...\nClosest: student_onnx_int8 (...)"
    screen = first_screen(rows, {"no_champion": {"message": message}}, 5001, "reports/comparison.md")
    assert "closest to the SLA" in screen.splitlines()[4] and screen.endswith(message) and "curl" not in screen
