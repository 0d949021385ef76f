"""CPU latency of every family member, measured in one run, interleaved, each member in its own
process; every speedup is a ratio against the PyTorch fp32 teacher of this same run."""

from __future__ import annotations

import logging
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.config import Params
from pipeline.data.prepared import load_split
from pipeline.errors import ModelError
from pipeline.evaluation.family import REFERENCE, Member, family
from pipeline.evaluation.latency import (
    ONE_SESSION,
    SESSIONS,
    machine_info,
    quiet_machine,
    run_benchmark,
    thread_settings,
)
from pipeline.evaluation.record import ModelRecord
from pipeline.evaluation.stopping import benchmark_stopping
from pipeline.io import write_json
from pipeline.stage import Stage

log = logging.getLogger(__name__)


def present_members(params: Params) -> list[Member]:
    members = []
    for member in family(params):
        if member.is_present():
            members.append(member)
        elif member.excluded_reason():
            log.warning("%s is left out of the benchmark: it %s", member.name, member.excluded_reason())
        elif member.not_built_reason():
            log.warning("%s is left out of the benchmark: it was not built (%s)", member.name, member.not_built_reason())
        else:
            log.warning("%s not found at %s: left out of the benchmark", member.name, member.path)
    if not members or members[0].name != REFERENCE:
        raise ModelError(f"the reference PyTorch teacher is missing at {params.paths.teacher}; run dvc repro first")
    return members


def run(params: Params) -> dict[str, Any]:
    """Time every member found under params.paths; write paths.benchmark."""
    cfg = params.benchmark
    texts = [row["text"] for row in load_split(params.path(params.paths.prepared), "test")]
    members = present_members(params)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with quiet_machine() as load, Progress(*columns) as progress:
        timings = run_benchmark(
            members,
            texts,
            params.task.max_length,
            cfg.threads,
            benchmark_stopping(cfg),
            cfg.warmup_runs,
            cfg.throughput_batch_size,
            cfg.throughput_batches,
            cfg.seed,
            progress,
        )
    settings = [str(t) for t in thread_settings(cfg.threads)]
    reference = timings[REFERENCE]
    entries = []
    for member in members:
        timing = timings[member.name]
        entries.append(
            {
                "name": member.name,
                "kind": member.kind,
                "format": member.format,
                "precision": member.precision,
                "servable": member.servable,
                "alternative": member.alternative,
                "path": str(member.path.relative_to(params.root)) if member.path.is_relative_to(params.root) else str(member.path),
                "size_mb": round(member.size_mb(), 3),
                "num_parameters": ModelRecord.read(member.path).num_parameters,
                **timing,
                "speedup_vs_teacher": {
                    t: reference["latency_ms"][t]["p50"] / timing["latency_ms"][t]["p50"] for t in settings
                },
                "throughput_vs_teacher": {
                    t: timing["throughput_per_second"][t] / reference["throughput_per_second"][t] for t in settings
                },
            }
        )
    result = {
        "machine": {**machine_info(), "load": load},
        "settings": {**cfg.model_dump(), "thread_counts": settings, "test_sentences": len(texts),
                     "max_length": params.task.max_length},
        "reference": REFERENCE,
        "members": entries,
    }
    write_json(params.path(params.paths.benchmark), result)
    from pipeline import tracking

    tracking.log_artifact(params.path(params.paths.benchmark), "benchmark")
    metrics: dict[str, Any] = {}
    for entry in entries:
        for t in settings:
            metrics[f"{entry['name']}.latency_ms_p50_t{t}"] = entry["latency_ms"][t]["p50"]
            metrics[f"{entry['name']}.speedup_t{t}"] = entry["speedup_vs_teacher"][t]
            metrics[f"{entry['name']}.latency_runs_t{t}"] = entry["latency_ms"][t]["runs"]
        metrics[f"{entry['name']}.peak_rss_mb"] = entry["peak_rss_mb"]
        if "all_cores_throughput" in entry:
            layouts = entry["all_cores_throughput"]
            for layout in (ONE_SESSION, SESSIONS):
                metrics[f"{entry['name']}.all_cores_{layout}_per_second"] = layouts[layout]
    return metrics


STAGE = Stage("benchmark", run, sections=("benchmark",), outputs=("benchmark",))

if __name__ == "__main__":
    STAGE.main()
