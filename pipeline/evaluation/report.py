"""The family table (JSON rows, Markdown, CSV), the Pareto front and the choice of the champion under
an SLA: pure functions of the benchmark and the members' records. The figures are in pipeline.evaluation.plots."""

from __future__ import annotations

import csv
import io
from typing import Any

from pipeline.config.evaluation import SLAConfig
from pipeline.config.search import SearchGoals
from pipeline.evaluation.latency import ONE_SESSION, SESSIONS
from pipeline.evaluation.record import ModelRecord
from pipeline.orchestration.search.goals import Outcome, closest, shortfalls

# Columns of family.json, in table order, with how to pick the best value of each.
COLUMNS: list[tuple[str, str, str | None]] = [
    # key, header, "max" | "min" | None (not ranked)
    ("name", "member", None),
    ("format", "format", None),
    ("precision", "precision", None),
    ("num_parameters", "params", "min"),
    ("size_mb", "size MB", "min"),
    ("test_macro_f1", "test macro-F1", "max"),
    ("test_macro_f1_ci95", "95% CI", None),
    ("test_accuracy", "accuracy", "max"),
    ("f1_retention", "F1 retention", "max"),  # test macro-F1 / the teacher's
    ("latency_ms_p50", "p50 ms", "min"),
    ("latency_ms_p95", "p95 ms", "min"),
    ("latency_ms_p99", "p99 ms", "min"),
    ("e2e_latency_ms_p50", "e2e p50 ms", "min"),
    ("throughput_b32", "sent/s b32", "max"),
    ("speedup_vs_teacher", "speedup", "max"),
    ("compression_vs_teacher", "compression", "max"),
    ("peak_rss_mb", "peak RSS MB", "min"),
]


def family_table(benchmark: dict[str, Any], records: dict[str, ModelRecord]) -> list[dict[str, Any]]:
    """One row per benchmarked member, joining its timings with its checkpoint record."""
    reference = benchmark["reference"]
    settings = benchmark["settings"]["thread_counts"]
    one, many = settings[0], settings[-1]
    entries = {entry["name"]: entry for entry in benchmark["members"]}
    teacher = records[reference]
    rows = []
    for name, entry in entries.items():
        record = records[name]
        row = {
            "name": name,
            "format": entry["format"],
            "precision": entry["precision"],
            "servable": entry["servable"],  # can be registered and served as the champion
            "alternative": entry.get("alternative", False),  # a reference member (pipeline/baselines/)
            "num_parameters": entry["num_parameters"],
            "size_mb": entry["size_mb"],
            "test_macro_f1": record.test["macro_f1"],
            "test_macro_f1_ci95": record.test["macro_f1_ci95"],
            "test_accuracy": record.test["accuracy"],
            "validation_macro_f1": record.validation["macro_f1"],
            "validation_f1_retention": record.validation["macro_f1"] / teacher.validation["macro_f1"],
            "f1_retention": record.test["macro_f1"] / teacher.test["macro_f1"],
            "latency_ms_p50": entry["latency_ms"][one]["p50"],
            "latency_ms_p95": entry["latency_ms"][one]["p95"],
            "latency_ms_p99": entry["latency_ms"][one]["p99"],
            # How long the benchmark timed it: runs, the p50's 95% interval, why it stopped.
            "latency_runs": entry["latency_ms"][one]["runs"],
            "latency_p50_ci95": entry["latency_ms"][one].get("p50_ci95"),
            "latency_stopped": entry["latency_ms"][one].get("stopped"),
            "latency_ms_p50_all_cores": entry["latency_ms"][many]["p50"],
            "e2e_latency_ms_p50": entry["e2e_latency_ms"][one]["p50"],
            "throughput_b32": entry["throughput_per_second"][one],
            "throughput_b32_all_cores": entry["throughput_per_second"][many],
            "speedup_vs_teacher": entry["speedup_vs_teacher"][one],
            "speedup_vs_teacher_all_cores": entry["speedup_vs_teacher"][many],
            "compression_vs_teacher": entries[reference]["size_mb"] / entry["size_mb"],
            "peak_rss_mb": entry["peak_rss_mb"],
        }
        layouts = entry.get("all_cores_throughput")  # ONNX members: one N-thread session vs N one-thread sessions
        if layouts:
            row["throughput_all_cores_one_session"] = layouts[ONE_SESSION]
            row["throughput_all_cores_sessions"] = layouts[SESSIONS]
            row["serving_layout"] = layouts["best_layout"]
        rows.append(row)
    return rows


def pareto_front(rows: list[dict[str, Any]], x: str = "latency_ms_p50", y: str = "test_macro_f1") -> list[str]:
    """Names of the members no other member beats on both lower `x` and higher `y`, by ascending x."""
    candidates = [row for row in rows if row.get(x) is not None and row.get(y) is not None]
    front = []
    for row in candidates:
        dominated = any(
            other[x] <= row[x] and other[y] >= row[y] and (other[x] < row[x] or other[y] > row[y])
            for other in candidates
        )
        if not dominated:
            front.append(row)
    return [row["name"] for row in sorted(front, key=lambda r: r[x])]


def _interval(interval: list[float]) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}] ms"


def pick_champion(rows: list[dict[str, Any]], sla: SLAConfig) -> tuple[dict[str, Any] | None, str]:
    """The fastest servable member (one that can be registered and served) that meets the SLA, and a
    sentence saying why it won or why nothing qualified. `rows` are not changed.

    Quality is judged on validation, never test: a member qualifies when its p50 latency is within
    the SLA and its validation macro-F1 keeps `min_f1_retention` of the teacher's. Among those the
    fastest wins (ties: the better validation macro-F1), since quality is already good enough.
    """
    servable = [row for row in rows if row["servable"]]
    eligible = [
        row for row in servable
        if row["latency_ms_p50"] <= sla.max_latency_ms and (row["validation_f1_retention"] or 0) >= sla.min_f1_retention
    ]
    sla_text = f"p50 <= {sla.max_latency_ms} ms at 1 thread and validation F1 retention >= {sla.min_f1_retention}"
    if not eligible:
        if not servable:
            why = "no servable member was benchmarked (export the ONNX models: dvc repro export_onnx)"
        else:
            # Each half of the SLA from the side of the other: what the members meeting one miss of the other.
            keeping = [row for row in servable if (row["validation_f1_retention"] or 0) >= sla.min_f1_retention]
            fast = [row for row in servable if row["latency_ms_p50"] <= sla.max_latency_ms]
            if keeping:
                fastest = min(keeping, key=lambda r: r["latency_ms_p50"])
                latency = (f"the fastest keeping the retention, {fastest['name']}, has p50 "
                           f"{fastest['latency_ms_p50']:.2f} ms")
            else:
                latency = f"none keeps a validation F1 retention of {sla.min_f1_retention}"
            if fast:
                best = max(fast, key=lambda r: r["validation_f1_retention"] or 0)
                retention = (f"the best retention within {sla.max_latency_ms} ms, {best['name']}'s, is "
                             f"{best['validation_f1_retention'] or 0:.3f}")
            else:
                retention = f"none has p50 <= {sla.max_latency_ms} ms"
            why = f"no servable member meets the SLA ({sla_text}): {latency}; {retention}"
        return None, why + "; nothing was registered"
    best = min(eligible, key=lambda r: (r["latency_ms_p50"], -(r["validation_macro_f1"] or 0)))
    interval = best.get("latency_p50_ci95")
    edge = (
        f"; its p50's 95% interval, {_interval(interval)}, reaches over {sla.max_latency_ms:g} ms: "
        "another benchmark run may not register it"
        if interval and interval[1] > sla.max_latency_ms else ""
    )
    return best, (
        f"{best['name']}, the fastest of the {len(eligible)} servable members within the SLA "
        f"(p50 {best['latency_ms_p50']:.2f} ms <= {sla.max_latency_ms} ms, validation F1 retention "
        f"{best['validation_f1_retention']:.3f} >= {sla.min_f1_retention}){edge}"
    )


def search_command(sla: SLAConfig) -> str:
    """The `make search` that looks for a member meeting this SLA: its goals are the SLA's axes."""
    retention = f"{sla.min_f1_retention:g}" if sla.min_f1_retention else "null"  # 0: no retention goal
    return (f'make search SEARCH_ARGS="search.goals.min_retention={retention} '
            f'search.goals.max_latency_ms={sla.max_latency_ms:g}"')


def closest_member(rows: list[dict[str, Any]], sla: SLAConfig) -> dict[str, Any] | None:
    """The servable member closest to the SLA when none meets it, as the search picks its closest
    trial (smallest sum of shortfalls relative to each goal): its name, its distance to each goal (0
    when met), the same in words, and the command that searches for a member meeting the SLA. None
    when nothing servable was benchmarked. Reference members are not candidates: no compression search
    can bring them closer."""
    # An SLA retention of 0 asks for none: no retention goal (the search's goals are > 0 or null).
    goals = SearchGoals(min_retention=sla.min_f1_retention or None, max_latency_ms=sla.max_latency_ms, max_size_mb=None)
    servable = [row for row in rows if row["servable"] and not row.get("alternative")]
    outcomes = [
        Outcome(number=i, state="COMPLETE", retention=row["validation_f1_retention"] or 0.0,
                latency_ms=row["latency_ms_p50"], size_mb=row["size_mb"])
        for i, row in enumerate(servable)
    ]
    nearest = closest(outcomes, goals).get("overall")
    if nearest is None:
        return None
    gaps = shortfalls(outcomes[nearest["trial"]], goals)
    return {
        "member": servable[nearest["trial"]]["name"],
        "latency_p50_ci95": servable[nearest["trial"]].get("latency_p50_ci95"),
        "distance": {"min_f1_retention": gaps.get("min_retention", 0.0), "max_latency_ms": gaps["max_latency_ms"]},
        "gaps": nearest["gaps"],
        "command": search_command(sla),
    }


def no_champion_message(near: dict[str, Any] | None, sla: SLAConfig) -> str:
    """What the report, its MLflow run and `make serve` say when no member meets the SLA."""
    lines = [f"No servable member meets the SLA (p50 <= {sla.max_latency_ms:g} ms at 1 thread, validation F1 "
             f"retention >= {sla.min_f1_retention:g}): no champion was registered."]
    if near is None:
        return "\n".join([*lines, "No servable member was benchmarked: export the ONNX models (dvc repro export_onnx)."])
    lines.append(f"Closest: {near['member']} (validation {'; '.join(near['gaps'])}).")
    interval = near.get("latency_p50_ci95")
    if near["distance"]["max_latency_ms"] > 0 and interval and interval[0] <= sla.max_latency_ms:
        lines.append(
            f"Its p50's 95% interval, {_interval(interval)}, reaches under {sla.max_latency_ms:g} ms: "
            "the gap is within the benchmark's noise, and a re-run on a quiet machine "
            "(dvc repro -f -s benchmark && dvc repro report) may register it."
        )
    return "\n".join([
        *lines,
        "A compression search with the SLA as its goals may close the gap:",
        f"  {near['command']}",
    ])


def _format(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "test_macro_f1_ci95":
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    if key == "num_parameters":
        return f"{value / 1e6:.2f}M"
    if key in ("speedup_vs_teacher", "compression_vs_teacher"):
        return f"{value:.1f}x"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def best_values(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = {}
    for key, _, direction in COLUMNS:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if direction and values:
            best[key] = max(values) if direction == "max" else min(values)
    return best


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The family table; the best value of each ranked column is in bold."""
    best = best_values(rows)
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = []
        for key, _, _ in COLUMNS:
            text = _format(key, row.get(key))
            if key == "name" and row.get("alternative"):
                text += " (reference)"
            cells.append(f"**{text}**" if key in best and row.get(key) == best[key] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_alternative(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The reference member with the best test macro-F1 (ties: the faster end to end), or None."""
    alternatives = [row for row in rows if row.get("alternative")]
    return max(alternatives, key=lambda r: (r["test_macro_f1"], -r["e2e_latency_ms_p50"]), default=None)


def alternatives_verdict(
    rows: list[dict[str, Any]], champion: dict[str, Any] | None, sla: SLAConfig, not_built: dict[str, str] | None = None
) -> str | None:
    """One sentence on what the champion buys over the best reference member (the cheapest alternative),
    or that it buys nothing; None when no reference member was measured or left out.

    Quality is test macro-F1 in points; latency is end to end (text in, answer out) at batch 1 and 1
    thread, since a reference member's featurizing is its model: the family's model-only times would
    leave their tokenizers out and flatter it.
    """
    best = best_alternative(rows)
    skipped = "".join(f" {name} was not built: {reason}." for name, reason in (not_built or {}).items())
    if best is None:
        return skipped.strip() or None
    kept = f"keeps {best['f1_retention']:.1%} of the teacher's test macro-F1"
    if champion is None:
        return f"No champion to compare; the best alternative, {best['name']}, {kept} at end-to-end p50 {best['e2e_latency_ms_p50']:.2f} ms.{skipped}"
    if champion.get("alternative"):
        return (f"The champion is the reference member {champion['name']}: it {kept.removeprefix('keeps ')} "
                f"at end-to-end p50 {champion['e2e_latency_ms_p50']:.2f} ms and meets the SLA; the compressed "
                f"family buys nothing here: ship it.{skipped}")
    margin = 100 * (champion["test_macro_f1"] - best["test_macro_f1"])
    ratio = champion["e2e_latency_ms_p50"] / best["e2e_latency_ms_p50"]
    difference = f"{margin:+.1f} points of test macro-F1 over" if margin >= 0 else f"{-margin:.1f} points of test macro-F1 below"
    line = (f"The champion is {difference} the best alternative, {best['name']} "
            f"({best['test_macro_f1']:.3f}), at {ratio:.2f}x its latency (end-to-end p50 "
            f"{champion['e2e_latency_ms_p50']:.2f} vs {best['e2e_latency_ms_p50']:.2f} ms, 1 thread)")
    low, high = champion["test_macro_f1_ci95"] or (champion["test_macro_f1"],) * 2
    if low <= best["test_macro_f1"] <= high:
        line += f"; {best['name']}'s macro-F1 is inside the champion's 95% interval"
    if margin <= 0 or best["f1_retention"] >= sla.min_f1_retention:
        line += f"; {best['name']} {kept} at {1 / ratio:.2g}x the champion's latency: consider shipping it"
    return line + "." + skipped


def other_work_sentence(load: dict[str, Any]) -> str:
    """How much other work shared the CPU when the timing started (empty for records without it)."""
    other = load.get("other_work_cores_before")
    if other is None:
        return ""
    verdict = "busy: the timings are likely slower than on a quiet machine" if load.get("busy") else "quiet"
    return f" Other processes used {other:.2f} of its cores when the timing started ({verdict})."


def comparison_markdown(
    rows: list[dict[str, Any]], benchmark: dict[str, Any], front: list[str], champion_note: str, sla: SLAConfig,
    excluded: dict[str, str] | None = None,
    no_champion: str | None = None,
    verdict: str | None = None,
) -> str:
    """The comparison page; `excluded` are the members left out with their reason, listed under the table;
    `no_champion`: the closest-member message when no member meets the SLA."""
    machine = benchmark["machine"]
    settings = benchmark["settings"]
    threads = settings["thread_counts"]
    return "\n".join(
        [
            "# FinCompress family comparison",
            "",
            f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['machine']}); "
            f"torch {machine.get('torch', 'n/a')}, onnxruntime {machine['onnxruntime']}, Python {machine['python']}."
            + other_work_sentence(machine.get("load", {})),
            f"Latency: batch 1 on {settings['test_sentences']} real test sentences (max length "
            f"{settings['max_length']}), model only, {threads[0]} thread, after warm-up; the members interleaved in "
            f"rounds (a new random order each), each timed until its p50's 95% interval is within "
            f"+-{settings['rel_ci']:.0%} of it (at least {settings['min_runs']} runs over {settings['min_rounds']} "
            f"rounds; at most {settings['max_runs']} runs or {settings['max_seconds']:g} s: the runs each member "
            f"needed are below the table). `e2e` includes tokenization. Throughput: batch "
            f"{settings['throughput_batch_size']}, {threads[0]} thread. Speedup and compression are ratios against "
            "the PyTorch fp32 teacher of the same run. Peak RSS: the high-water mark (VmHWM) of the member's own "
            "worker process, a fresh one that loaded only what the member needs (no torch for ONNX members), "
            "after its timing. Bold: best in column.",
            "",
            markdown_table(rows),
            "",
            runs_line(rows),
            "",
            *[f"Left out: {name} {reason}." for name, reason in (excluded or {}).items()],
            *([""] if excluded else []),
            *([verdict, ""] if verdict else []),
            f"Pareto front (test macro-F1 vs p50 latency): {', '.join(front)}.",
            "",
            f"SLA: p50 <= {sla.max_latency_ms} ms at 1 thread, F1 retention >= {sla.min_f1_retention}. "
            f"Champion: {champion_note}.",
            "",
            *([f"```\n{no_champion}\n```", ""] if no_champion else []),
            f"All cores ({threads[-1]} threads), p50 ms: "
            + ", ".join(f"{row['name']} {row['latency_ms_p50_all_cores']:.2f}" for row in rows)
            + ".",
            "",
            *serving_layout_lines(rows, settings, machine["cores"]),
        ]
    )


def runs_line(rows: list[dict[str, Any]]) -> str:
    """How many timed runs each member needed at 1 thread (model only) and how close its p50 got."""
    def one(row: dict[str, Any]) -> str:
        low, high = row.get("latency_p50_ci95") or (None, None)
        precision = f"+-{(high - low) / 2 / row['latency_ms_p50']:.1%}" if low is not None else "no interval"
        capped = "" if row.get("latency_stopped") in ("stable", None) else f", stopped at {row['latency_stopped']}"
        return f"{row['name']} {row.get('latency_runs')} ({precision}{capped})"

    return "Runs per member at 1 thread, model only (the p50's 95% interval): " + ", ".join(map(one, rows)) + "."


LAYOUT_NAMES = {ONE_SESSION: "one session with {n} threads", SESSIONS: "{n} sessions with 1 thread each"}


def serving_layout_lines(rows: list[dict[str, Any]], settings: dict[str, Any], cores: int) -> list[str]:
    """Which serving layout gives each ONNX member the most sentences per second on all cores."""
    timed = [row for row in rows if row.get("serving_layout")]
    if not timed:
        return []
    lines = [
        f"Serving layout on all cores (batch {settings['throughput_batch_size']}, sentences/s; use the faster):",
        "",
    ]
    for row in timed:
        per_second = {ONE_SESSION: row["throughput_all_cores_one_session"], SESSIONS: row["throughput_all_cores_sessions"]}
        best = row["serving_layout"]
        other = SESSIONS if best == ONE_SESSION else ONE_SESSION
        lines.append(
            f"- {row['name']}: use {LAYOUT_NAMES[best].format(n=cores)} ({per_second[best]:.0f}/s; "
            f"{LAYOUT_NAMES[other].format(n=cores)}: {per_second[other]:.0f}/s)."
        )
    return [*lines, ""]


def comparison_csv(rows: list[dict[str, Any]]) -> str:
    keys = [key for key, _, _ in COLUMNS if key != "test_macro_f1_ci95"] + [
        "ci95_low", "ci95_high", "validation_macro_f1", "latency_ms_p50_all_cores", "throughput_b32_all_cores"
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(keys)
    for row in rows:
        ci = row.get("test_macro_f1_ci95") or [None, None]
        values = {**row, "ci95_low": ci[0], "ci95_high": ci[1]}
        writer.writerow(["" if values.get(key) is None else values[key] for key in keys])
    return buffer.getvalue()
