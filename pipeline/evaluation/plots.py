"""The report's figures (matplotlib): the Pareto plot of the family and the training loss curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from pipeline.config.evaluation import SLAConfig  # noqa: E402


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
        marker = "s" if row["precision"] == "int8" else "o"
        if row.get("alternative"):  # a reference member: a cheap alternative, not part of the family
            colour, marker = "tab:gray", "D"
        ax.scatter(row["latency_ms_p50"], row["test_macro_f1"], s=30 + 1500 * row["size_mb"] / largest,
                   color=colour, alpha=0.45, edgecolors="black", linewidths=0.8, marker=marker, zorder=3)
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
        plt.Line2D([], [], marker="D", linestyle="", color="tab:gray", alpha=0.6, label="reference (tfidf, static)"),
        plt.Line2D([], [], marker="*", linestyle="", color="gold", markeredgecolor="black", markersize=12,
                   label="champion (SLA)"),
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    label_members(ax, plotted, front)
    fig.savefig(path)
    plt.close(fig)


PHASE_COLUMN = "phase"


def read_curve(path: Path) -> list[dict[str, float]]:
    """The numeric columns of a curve CSV, per row (the `phase` column of a two-phase KD is text: left out)."""
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if k != PHASE_COLUMN and v not in ("", None)}
                for row in csv.DictReader(handle)]


def read_phases(path: Path) -> list[str]:
    """Each row's training phase (pipeline/kd/phases.py), "" where the curve has none."""
    with open(path, newline="") as handle:
        return [row.get(PHASE_COLUMN) or "" for row in csv.DictReader(handle)]


def loss_columns(rows: list[dict[str, float]]) -> list[str]:
    """Every `loss_<name>` column of a curve, in the order the CSV has them; the Trainer's train_loss
    only when the curve logs no loss_total (plain fine-tuning)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    losses = [key for key in columns if key.startswith("loss_")]
    if "loss_total" not in losses and "train_loss" in columns:
        losses.append("train_loss")
    return losses


def loss_curves_plot(curves: dict[str, Path], path: Path) -> None:
    """One panel per training stage: every loss component per epoch, and validation macro-F1."""
    # A stage that trained nothing (prune with nothing removed) writes an empty curve: no panel.
    rows_by_name = {name: read_curve(p) for name, p in curves.items() if p.is_file()}
    present = {name: curves[name] for name, rows in rows_by_name.items() if rows}
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4.5 * max(1, len(present)), 4), dpi=110,
                             squeeze=False)
    for ax, (name, curve_path) in zip(axes[0], present.items()):
        rows = rows_by_name[name]
        x = list(range(1, len(rows) + 1))
        phases = read_phases(curve_path)
        for boundary in [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]:
            ax.axvline(boundary + 0.5, color="grey", linestyle=":", linewidth=1)  # a new KD phase starts
        for key in loss_columns(rows):
            ax.plot(x, [row.get(key) for row in rows], marker="o", label=key.removeprefix("loss_"))
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


def search_plot(
    trials: list[Any], front: list[int], goals: Any, teacher_f1: float, path: Path, answer: int | None = None,
    answer_label: str = "winner",
) -> None:
    """A search's complete trials: validation macro-F1 against p50 latency (log scale), marker area
    proportional to size; the Pareto front (F1, latency, size) highlighted, the goal box shaded (the
    size goal, when set, marks the trials over it with a cross), and the search's answer (the winner,
    or the closest trial when none meets every goal) starred under `answer_label`."""
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if trials:
        largest = max(t.size_mb for t in trials)
        for t in trials:
            on_front = t.number in front
            ax.scatter(t.latency_ms, t.validation_macro_f1, s=30 + 600 * t.size_mb / largest,
                       color="tab:green" if on_front else "tab:blue", alpha=0.5, edgecolors="black",
                       linewidths=1.4 if on_front else 0.6, zorder=3)
            if goals.max_size_mb is not None and t.size_mb > goals.max_size_mb:
                ax.scatter(t.latency_ms, t.validation_macro_f1, marker="x", s=60, color="tab:red", zorder=4)
            ax.annotate(f"{t.number}", (t.latency_ms, t.validation_macro_f1), xytext=(6, 4),
                        textcoords="offset points", fontsize=8, fontweight="bold" if on_front else "normal")
            if t.number == answer:
                ax.scatter(t.latency_ms, t.validation_macro_f1, marker="*", s=300, color="gold",
                           edgecolors="black", zorder=5)
        points = sorted((t for t in trials if t.number in front), key=lambda t: t.latency_ms)
        ax.step([t.latency_ms for t in points], [t.validation_macro_f1 for t in points], where="post",
                color="tab:green", linewidth=1.5, zorder=2)
    # Limits from the points, the goals and the teacher line, with room around them (one trial alone
    # would otherwise get a span of several decades).
    xs = [t.latency_ms for t in trials] + ([goals.max_latency_ms] if goals.max_latency_ms is not None else [])
    y_goal = goals.min_retention * teacher_f1 if goals.min_retention is not None else None
    ys = [t.validation_macro_f1 for t in trials] + [teacher_f1] + ([y_goal] if y_goal is not None else [])
    left, right = (min(xs) / 1.4, max(xs) * 1.4) if xs else (0.1, 10.0)
    pad = max(0.01, 0.08 * (max(ys) - min(ys)))
    bottom, top = min(ys) - pad, max(ys) + pad
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    # Ticks at plain 1-2-3-5 numbers (0.3, 0.5, 1, 2 ms), whatever the span.
    nice = [m * 10.0**e for e in range(-3, 5) for m in (1, 2, 3, 5) if left <= m * 10.0**e <= right]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(nice))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    x_goal = goals.max_latency_ms if goals.max_latency_ms is not None else right
    y_goal = y_goal if y_goal is not None else bottom
    ax.fill_between([left, x_goal], y_goal, top, color="tab:purple", alpha=0.08, zorder=0)
    ax.plot([left, x_goal, x_goal], [y_goal, y_goal, top], color="tab:purple", linestyle=":", zorder=1)
    ax.axhline(teacher_f1, color="tab:red", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("p50 latency, batch 1, 1 thread (ms, log scale)")
    ax.set_ylabel("validation macro-F1")
    size = f", size <= {goals.max_size_mb:g} MB (x: over)" if goals.max_size_mb is not None else ""
    ax.set_title(f"Search trials (marker area ~ size); goal box shaded{size}", fontsize=10)
    handles = [
        plt.Line2D([], [], color="tab:green", linewidth=1.5, marker="o", label="Pareto front (F1, p50, size)"),
        plt.Line2D([], [], marker="o", linestyle="", color="tab:blue", alpha=0.6, label="other trials"),
        plt.Line2D([], [], color="tab:purple", linestyle=":", label="goals"),
        plt.Line2D([], [], color="tab:red", linewidth=0.8, label="teacher (validation)"),
    ]
    if any(t.number == answer for t in trials):
        handles.append(plt.Line2D([], [], marker="*", linestyle="", color="gold", markeredgecolor="black",
                                  markersize=12, label=answer_label))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
