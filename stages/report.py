"""The comparison report: the family table (JSON, Markdown, CSV), the Pareto plot, the loss curves,
one comparable MLflow run per member, and the SLA champion registered in the MLflow Model Registry."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import Params
from pipeline.errors import ModelError
from pipeline.evaluation import plots, report
from pipeline.evaluation.family import family
from pipeline.evaluation.model_card import CARD_FILE, card_for
from pipeline.evaluation.record import ModelRecord
from pipeline.io import read_json, write_json, write_text_atomic
from pipeline.stage import Stage

log = logging.getLogger(__name__)

# Training curves drawn in loss_curves.png (the students and the pruning recovery).
CURVES = ("student_baseline", "distill_vanilla", "distill_intermediate", "prune")
# Metrics every member's MLflow run carries under the same names, so the compare view lines them up.
COMPARABLE = (
    "test_macro_f1", "test_accuracy", "validation_macro_f1", "f1_retention", "num_parameters", "size_mb",
    "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "e2e_latency_ms_p50", "latency_ms_p50_all_cores",
    "throughput_b32", "speedup_vs_teacher", "compression_vs_teacher", "peak_rss_mb",
)


def register_champion(row: dict[str, Any], model_dir: Path, name: str, card: str) -> str:
    """Log the champion as a text-in pyfunc model with `card` as its README.md, register it under
    `name` with the alias 'champion', and tag the version with the member's metrics."""
    import mlflow

    from pipeline.export.serving import log_pyfunc

    with tempfile.TemporaryDirectory(prefix="fincompress-champion-") as tmp:
        # The exported directory's card cannot know the latency yet; the registered one carries it.
        staged = Path(tmp) / model_dir.name
        shutil.copytree(model_dir, staged)
        (staged / CARD_FILE).write_text(card, encoding="utf-8")
        info = log_pyfunc(staged, "champion", registered_model_name=name, tags={"family_member": row["name"]})
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.update_model_version(name, version, description=card)
    client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, "family_member", row["name"])
    for key in COMPARABLE:
        if row.get(key) is not None:
            client.set_model_version_tag(name, version, key, f"{row[key]:.6g}")
    return version


def log_for_review(rows: list[dict[str, Any]], out: Path) -> None:
    """The comparison table as an MLflow table and the plots as images, shown in the run's UI pages."""
    import mlflow
    import pandas as pd
    from PIL import Image

    mlflow.log_table(pd.DataFrame(rows), artifact_file="report/comparison_table.json")
    for name in ("pareto", "loss_curves"):
        with Image.open(out / f"{name}.png") as image:
            mlflow.log_image(image.convert("RGB"), key=name)


def run(params: Params) -> dict[str, Any]:
    """Read paths.benchmark and every member's checkpoint_info.json; write the reports."""
    import mlflow

    benchmark_path = params.path(params.paths.benchmark)
    if not benchmark_path.is_file():
        raise ModelError(f"{benchmark_path} not found; run the benchmark stage first (dvc repro benchmark)")
    benchmark = read_json(benchmark_path)
    members = {member.name: member for member in family(params)}
    records = {entry["name"]: ModelRecord.read(members[entry["name"]].path) for entry in benchmark["members"]}
    rows = report.family_table(benchmark, records)
    # Members export_onnx left out (a failed parity gate) and students their stage did not build
    # (switched off): listed with their reason, never benchmarked or chosen.
    excluded = {member.name: reason for member in members.values() if (reason := member.excluded_reason())}
    not_built = {member.name: reason for member in members.values() if (reason := member.not_built_reason())}
    excluded |= {name: f"was not built: {reason}" for name, reason in not_built.items() if not members[name].alternative}
    front = report.pareto_front(rows)
    sla = params.report.sla
    champion, note = report.pick_champion(rows, sla)
    near = report.closest_member(rows, sla) if champion is None else None
    no_champion = report.no_champion_message(near, sla) if champion is None else None
    for row in rows:
        row["pareto_optimal"] = row["name"] in front
        row["champion"] = champion is not None and row["name"] == champion["name"]
        row["closest_to_sla"] = near is not None and row["name"] == near["member"]

    # The reference members: what the champion buys over the cheapest alternatives (or that it buys nothing).
    verdict = report.alternatives_verdict(rows, champion, sla, {name: reason for name, reason in not_built.items()
                                                                if members[name].alternative})

    out = params.path(params.paths.reports)
    write_json(out / "family.json", rows + [{"name": name, "excluded": reason} for name, reason in excluded.items()])
    write_text_atomic(out / "comparison.md", report.comparison_markdown(rows, benchmark, front, note, sla, excluded, no_champion, verdict))
    write_text_atomic(out / "comparison.csv", report.comparison_csv(rows))
    curves = {name: params.path(params.paths.curves) / f"{name}.csv" for name in CURVES}
    plots.pareto_plot(rows, front, out / "pareto.png", sla, champion["name"] if champion else None)
    plots.loss_curves_plot(curves, out / "loss_curves.png")
    for name in ("family.json", "comparison.md", "comparison.csv", "pareto.png", "loss_curves.png"):
        tracking.log_artifact(out / name, "report")
    log_for_review(rows, out)

    # The run says what came of the SLA, also when nothing was registered (the message is in
    # report/comparison.md too).
    mlflow.set_tags({"champion": champion["name"] if champion else "", "closest_member": near["member"] if near else "",
                     "no_champion": no_champion or ""})
    parent_tags = mlflow.active_run().data.tags
    for row in rows:
        tags = {key: parent_tags.get(key, "") for key in ("git_commit", "data_hash", "pipeline_run")}
        with mlflow.start_run(run_name=row["name"], nested=True,
                              tags={**tags, "stage": "report", "family_member": row["name"],
                                    "format": row["format"], "precision": row["precision"],
                                    "reference": str(row.get("alternative", False)).lower()}):
            tracking.log_metrics({key: row[key] for key in COMPARABLE if row.get(key) is not None})
    for name, reason in excluded.items():
        with mlflow.start_run(run_name=name, nested=True, tags={"stage": "report", "family_member": name,
                                                                "excluded": reason[:5000]}):
            tracking.log_metrics({"excluded": 1})

    metrics: dict[str, Any] = {
        row["name"]: {key: row[key] for key in ("test_macro_f1", "f1_retention", "size_mb", "latency_ms_p50",
                                                 "speedup_vs_teacher", "compression_vs_teacher")}
        for row in rows
    }
    metrics["pareto_front_size"] = len(front)
    metrics["excluded_members"] = len(excluded)
    alternative = report.best_alternative(rows)
    if alternative is not None:
        metrics["best_alternative"] = {"name": alternative["name"], "test_macro_f1": alternative["test_macro_f1"]}
        if champion is not None:
            metrics["best_alternative"]["champion_margin_points"] = 100 * (champion["test_macro_f1"] - alternative["test_macro_f1"])
            metrics["best_alternative"]["champion_e2e_latency_ratio"] = champion["e2e_latency_ms_p50"] / alternative["e2e_latency_ms_p50"]
    if verdict:
        log.info("%s", verdict)
    if champion is None:
        # What `make serve` and the end of `make run` print (they read this file, nothing is recomputed).
        metrics["no_champion"] = {"message": no_champion, "closest": near}
        log.warning("%s", no_champion)
    else:
        metrics["champion"] = {"member": champion["name"],
                               **{key: champion[key] for key in ("test_macro_f1", "latency_ms_p50", "size_mb")}}
        if params.report.register_champion:
            card = card_for(params, champion["name"], latency=champion, machine=benchmark.get("machine"))
            version = register_champion(
                champion, members[champion["name"]].path, params.report.registered_model_name, card
            )
            log.info("registered %s as %s version %s, alias 'champion'", champion["name"],
                     params.report.registered_model_name, version)
            metrics["champion"].update(registered_model_name=params.report.registered_model_name,
                                       registry_version=int(version))
    log.info("champion: %s", note)
    return metrics


STAGE = Stage("report", run, sections=("report",), outputs=("reports",))

if __name__ == "__main__":
    STAGE.main()
