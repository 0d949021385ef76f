"""The family table, the Pareto front, plots, and the choice of the champion under an SLA."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import SLAConfig  # noqa: E402
from pipeline.record import ModelRecord  # noqa: E402

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
    teacher_f1 = records[reference].test["macro_f1"]
    rows = []
    for name, entry in entries.items():
        record = records[name]
        row = {
            "name": name,
            "format": entry["format"],
            "precision": entry["precision"],
            "num_parameters": entry["num_parameters"],
            "size_mb": entry["size_mb"],
            "test_macro_f1": record.test["macro_f1"],
            "test_macro_f1_ci95": record.test["macro_f1_ci95"],
            "test_accuracy": record.test["accuracy"],
            "validation_macro_f1": record.validation["macro_f1"],
            "f1_retention": record.test["macro_f1"] / teacher_f1,
            "latency_ms_p50": entry["latency_ms"][one]["p50"],
            "latency_ms_p95": entry["latency_ms"][one]["p95"],
            "latency_ms_p99": entry["latency_ms"][one]["p99"],
            "latency_ms_p50_all_cores": entry["latency_ms"][many]["p50"],
            "e2e_latency_ms_p50": entry["e2e_latency_ms"][one]["p50"],
            "throughput_b32": entry["throughput_per_second"][one],
            "throughput_b32_all_cores": entry["throughput_per_second"][many],
            "speedup_vs_teacher": entry["speedup_vs_teacher"][one],
            "speedup_vs_teacher_all_cores": entry["speedup_vs_teacher"][many],
            "compression_vs_teacher": entries[reference]["size_mb"] / entry["size_mb"],
            "peak_rss_mb": entry["peak_rss_mb"],
        }
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


def choose_champion(rows: list[dict[str, Any]], sla: SLAConfig) -> tuple[dict[str, Any] | None, str]:
    """The fastest ONNX member (it is registered with the ONNX flavor) that meets the SLA.

    Quality is judged on validation, never test: a member qualifies when its p50 latency is within
    the SLA and its validation macro-F1 keeps `min_f1_retention` of the teacher's. Among those the
    fastest wins (ties: the better validation macro-F1), since quality is already good enough.
    """
    teacher = next(row for row in rows if row["name"] == "teacher")
    for row in rows:
        row["validation_f1_retention"] = (
            row["validation_macro_f1"] / teacher["validation_macro_f1"]
            if row.get("validation_macro_f1") is not None and teacher.get("validation_macro_f1") else None
        )
    eligible = [
        row for row in rows
        if row["format"] == "onnx"
        and row["latency_ms_p50"] <= sla.max_latency_ms
        and (row["validation_f1_retention"] or 0) >= sla.min_f1_retention
    ]
    if not eligible:
        return None, (
            f"no ONNX member meets the SLA (p50 <= {sla.max_latency_ms} ms at 1 thread and validation F1 "
            f"retention >= {sla.min_f1_retention}); nothing was registered"
        )
    best = min(eligible, key=lambda r: (r["latency_ms_p50"], -(r["validation_macro_f1"] or 0)))
    return best, (
        f"{best['name']}, the fastest of the {len(eligible)} ONNX members within the SLA "
        f"(p50 {best['latency_ms_p50']:.2f} ms <= {sla.max_latency_ms} ms, validation F1 retention "
        f"{best['validation_f1_retention']:.3f} >= {sla.min_f1_retention})"
    )


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
            cells.append(f"**{text}**" if key in best and row.get(key) == best[key] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(
    rows: list[dict[str, Any]], benchmark: dict[str, Any], front: list[str], champion_note: str, sla: SLAConfig
) -> str:
    machine = benchmark["machine"]
    settings = benchmark["settings"]
    threads = settings["thread_counts"]
    return "\n".join(
        [
            "# FinCompress family comparison",
            "",
            f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['machine']}); "
            f"torch {machine.get('torch', 'n/a')}, onnxruntime {machine['onnxruntime']}, Python {machine['python']}.",
            f"Latency: batch 1 on {settings['test_sentences']} real test sentences (max length "
            f"{settings['max_length']}), model only, {threads[0]} thread, at least {settings['min_runs']} runs and "
            f"{settings['min_seconds']} s per member after warm-up, members interleaved over {settings['rounds']} "
            f"rounds. `e2e` includes tokenization. Throughput: batch {settings['throughput_batch_size']}, "
            f"{threads[0]} thread. Speedup and compression are ratios against the PyTorch fp32 teacher of the "
            "same run. Peak RSS: each member in its own process. Bold: best in column.",
            "",
            markdown_table(rows),
            "",
            f"Pareto front (test macro-F1 vs p50 latency): {', '.join(front)}.",
            "",
            f"SLA: p50 <= {sla.max_latency_ms} ms at 1 thread, F1 retention >= {sla.min_f1_retention}. "
            f"Champion: {champion_note}.",
            "",
            f"All cores ({threads[-1]} threads), p50 ms: "
            + ", ".join(f"{row['name']} {row['latency_ms_p50_all_cores']:.2f}" for row in rows)
            + ".",
            "",
        ]
    )


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


def pareto_plot(
    rows: list[dict[str, Any]], front: list[str], path: Path, sla: SLAConfig, champion: str | None = None
) -> None:
    """Test macro-F1 against p50 latency (log scale); marker area proportional to size on disk.
    Pareto-optimal members are labelled in bold, the champion with a star."""
    plotted = [row for row in rows if row.get("test_macro_f1") is not None]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    largest = max(row["size_mb"] for row in plotted)
    for row in plotted:
        onnx = row["format"] == "onnx"
        colour = "tab:orange" if onnx else "tab:blue"
        if row["name"].startswith("teacher"):
            colour = "tab:red"
        ax.scatter(row["latency_ms_p50"], row["test_macro_f1"], s=30 + 1500 * row["size_mb"] / largest,
                   color=colour, alpha=0.45, edgecolors="black", linewidths=0.8,
                   marker="s" if row["precision"] == "int8" else "o", zorder=3)
        low, high = row["test_macro_f1_ci95"] or (row["test_macro_f1"],) * 2
        ax.errorbar(row["latency_ms_p50"], row["test_macro_f1"],
                    yerr=[[row["test_macro_f1"] - low], [high - row["test_macro_f1"]]],
                    color="grey", alpha=0.5, capsize=3, zorder=2)
        if row["name"] == champion:
            ax.scatter(row["latency_ms_p50"], row["test_macro_f1"], marker="*", s=260, color="gold",
                       edgecolors="black", zorder=4)
    ax.set_xscale("log")
    left, right = ax.get_xlim()
    ax.set_xlim(left, right * 1.5)  # room for the labels of the slowest members
    points = sorted((r for r in plotted if r["name"] in front), key=lambda r: r["latency_ms_p50"])
    ax.step([r["latency_ms_p50"] for r in points], [r["test_macro_f1"] for r in points], where="post",
            color="tab:green", linewidth=2, label="Pareto front", zorder=1)
    ax.axvline(sla.max_latency_ms, color="tab:purple", linestyle=":", label=f"SLA {sla.max_latency_ms} ms")
    ax.set_xlabel("p50 latency, batch 1, 1 thread (ms, log scale)")
    ax.set_ylabel("test macro-F1 (95% bootstrap CI)")
    ax.set_title("FinCompress family: quality against CPU latency (marker area ~ size on disk)")
    handles = [
        plt.Line2D([], [], color="tab:green", linewidth=2, label="Pareto front"),
        plt.Line2D([], [], color="tab:purple", linestyle=":", label=f"SLA {sla.max_latency_ms} ms"),
        plt.Line2D([], [], marker="o", linestyle="", color="tab:red", alpha=0.6, label="teacher"),
        plt.Line2D([], [], marker="o", linestyle="", color="tab:blue", alpha=0.6, label="PyTorch student"),
        plt.Line2D([], [], marker="o", linestyle="", color="tab:orange", alpha=0.6, label="ONNX"),
        plt.Line2D([], [], marker="s", linestyle="", color="grey", alpha=0.6, label="INT8 (square)"),
        plt.Line2D([], [], marker="*", linestyle="", color="gold", markeredgecolor="black", markersize=12,
                   label="champion (SLA)"),
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    label_members(ax, plotted, front)
    fig.savefig(path)
    plt.close(fig)


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def loss_curves_plot(curves: dict[str, Path], path: Path) -> None:
    """One panel per training stage: every loss component per epoch, and validation macro-F1."""
    present = {name: p for name, p in curves.items() if p.is_file()}
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4.5 * max(1, len(present)), 4), dpi=110,
                             squeeze=False)
    for ax, (name, curve_path) in zip(axes[0], present.items()):
        rows = read_curve(curve_path)
        x = list(range(1, len(rows) + 1))
        for key in ("loss_total", "loss_ce", "loss_kl", "loss_hidden", "loss_attention", "loss_relation", "train_loss"):
            if key == "train_loss" and "loss_total" in rows[0]:
                continue
            values = [row.get(key) for row in rows]
            if any(v is not None for v in values):
                ax.plot(x, values, marker="o", label=key.replace("loss_", ""))
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        twin = ax.twinx()
        twin.plot(x, [row.get("eval_macro_f1") for row in rows], color="black", linestyle="--", label="val macro-F1")
        twin.set_ylim(0, 1)
        twin.set_ylabel("validation macro-F1")
        lines, labels = ax.get_legend_handles_labels()
        extra_lines, extra_labels = twin.get_legend_handles_labels()
        ax.legend(lines + extra_lines, labels + extra_labels, fontsize=7, loc="center right")
    axes[0][0].set_ylabel("training loss (log)")
    fig.suptitle("Distillation loss components per epoch")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def label_members(ax: plt.Axes, rows: list[dict[str, Any]], front: list[str]) -> None:
    """Name and size beside each point, moved down until it overlaps no label already placed: the
    students of one architecture sit almost on top of each other."""
    renderer = ax.figure.canvas.get_renderer()  # also settles the axis limits, so boxes are final
    placed = []
    for row in sorted(rows, key=lambda r: -r["test_macro_f1"]):
        style = {
            "text": f"{row['name']}\n{row['size_mb']:.1f} MB",
            "xy": (row["latency_ms_p50"], row["test_macro_f1"]),
            "textcoords": "offset points", "va": "top", "fontsize": 8,
            "fontweight": "bold" if row["name"] in front else "normal",
        }
        offset = 8.0
        label = ax.annotate(xytext=(8, offset), **style)
        while any(label.get_window_extent(renderer).overlaps(box) for box in placed) and offset > -400:
            offset -= 3
            label.xyann = (8, offset)
        if offset < 0:  # moved off its point: draw a thin line back to it
            label.remove()
            label = ax.annotate(xytext=(8, offset), arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6},
                                **style)
        placed.append(label.get_window_extent(renderer))
