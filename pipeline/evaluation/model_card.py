"""Model cards: the README.md of every exported ONNX directory and of the registered champion (which may be
a reference member, pipeline/baselines/: its card says what it is instead of how it was exported).

One renderer for both. The export stage writes a card into each exported directory from its
checkpoint_info.json; latency is not known yet then (the benchmark runs after export), and its card
says where to find it. The report stage renders the complete card, with the benchmark's latency and
the machine it was measured on, for the registered model version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.data.prepared import MANIFEST_FILE
from pipeline.evaluation.family import REFERENCE, family
from pipeline.evaluation.record import INFO_FILE
from pipeline.io import read_json, write_text_atomic

CARD_FILE = "README.md"


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


GRAPHS = {
    "fused": "attention fused by ONNX Runtime's transformer optimizer, then dynamic INT8",
    "unfused": "the exported graph, dynamic INT8",
}
SIGNED_WEIGHTS = " with s8 weights (u8 x s8 GEMMs; this ISA's default is u8 x u8)"


def variant_description(name: str) -> str:
    """`fused`, `unfused`, or either with `_s8` (the export's s8-weight build where the ISA uses u8)."""
    graph, _, weights = name.partition("_")
    return GRAPHS.get(graph, name) + (SIGNED_WEIGHTS if weights == "s8" else "")


def variant_line(variant: dict[str, Any]) -> str:
    """Which INT8 variant the export kept, and why (export_onnx.int8_variants)."""
    chosen, candidates = variant["chosen"], variant.get("candidates", {})
    timed = {name: c["p50_ms"] for name, c in candidates.items() if "p50_ms" in c}
    text = f"{chosen} ({variant_description(chosen)})"
    if len(timed) > 1:
        timing = variant.get("timing", {})
        other = timing.get("other_work_cores")
        # Records before other_work_cores have only the load average, which counts the export's own work.
        load = (
            f"other processes using {other:.2f} cores" if other is not None
            else f"load average {_f((timing.get('load_average') or [None])[0], 1)}"
        )
        fastest = min(timed, key=timed.__getitem__)
        why = "the fastest passing the gates on validation" if timed[chosen] == timed[fastest] else (
            f"passing the gates on validation within {timing.get('tie', 0):.0%} of the fastest, {fastest} "
            "(export_onnx.int8_timing_tie), and built before it"
        )
        return text + f": {why}, p50 " + ", ".join(
            f"{name} {ms:.3f} ms" for name, ms in timed.items()
        ) + f" (batch 1, 1 thread, timed at export, {load})"
    for name, candidate in candidates.items():
        if name != chosen:
            text += f"; {name}: {candidate.get('skipped') or 'failed the gates on validation'}"
    return text


def _architecture(config: dict[str, Any]) -> str:
    parts = [config.get("model_type", "unknown architecture")]
    for key, what in (("num_hidden_layers", "layers"), ("hidden_size", "hidden size")):
        if key in config:
            parts.append(f"{config[key]} {what}")
    return ", ".join(str(part) for part in parts)


def _source(manifest: dict[str, Any]) -> str:
    """The data source as prepare_data recorded it (a dict: type and path or dataset name)."""
    source = manifest.get("source", "?")
    if isinstance(source, dict):
        where = source.get("path") or source.get("name") or source.get("dataset") or "?"
        return f"{source.get('type', 'data')} `{where}`"
    return f"`{source}`"


def _latency_section(latency: dict[str, Any] | None, machine: dict[str, Any] | None) -> list[str]:
    if latency is None:
        return [
            "Not measured when this directory was written: the benchmark stage runs after the export. "
            "The latency of every family member, and the machine it was measured on, is in "
            "`reports/comparison.md` (raw figures: `reports/benchmark.json`); the card of the registered "
            "champion version in the MLflow Model Registry includes it.",
        ]
    machine = machine or {}
    return [
        f"Measured by the benchmark stage on {machine.get('cpu', 'an unrecorded CPU')} "
        f"({machine.get('cores', '?')} cores, {machine.get('machine', '?')}, ONNX Runtime "
        f"{machine.get('onnxruntime', '?')}), one sentence per call:",
        "",
        "| | value |",
        "|---|---|",
        f"| p50 / p95 / p99, 1 thread (ms) | {_f(latency.get('latency_ms_p50'))} / "
        f"{_f(latency.get('latency_ms_p95'))} / {_f(latency.get('latency_ms_p99'))} |",
        f"| p50, all cores (ms) | {_f(latency.get('latency_ms_p50_all_cores'))} |",
        f"| end to end with tokenization, p50 (ms) | {_f(latency.get('e2e_latency_ms_p50'))} |",
        f"| throughput, batches, 1 thread (texts/s) | {_f(latency.get('throughput_b32'), 0)} |",
        f"| speedup vs the teacher | {_f(latency.get('speedup_vs_teacher'), 1)}x |",
        f"| peak RSS (MB) | {_f(latency.get('peak_rss_mb'), 0)} |",
    ]


def render_card(
    member: str,
    model_dir: str,
    info: dict[str, Any],
    config: dict[str, Any],
    manifest: dict[str, Any],
    teacher_info: dict[str, Any] | None,
    registered_model_name: str,
    latency: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
) -> str:
    """The Markdown card of one exported member.

    `model_dir` is the directory as a user names it (e.g. models/student_onnx/int8); `info` its
    checkpoint_info.json (a ModelRecord) and `config` its config.json; `manifest` the prepared data's manifest; `latency` the member's report row
    (None before the benchmark) and `machine` the benchmark's machine record.
    """
    info = {**info, **info.get("details", {})}  # the record's kind-specific details: precision, parity, ...
    test = info.get("test", {})
    names = info.get("label_names") or manifest.get("label_names", [])
    task_type = info.get("task_type", manifest.get("task_type", "single_label"))
    low, high = (test.get("macro_f1_ci95") or [None, None])[:2]
    per_class = test.get("per_class_f1") or test.get("per_label_f1") or {}
    teacher_f1 = (teacher_info or {}).get("test", {}).get("macro_f1")
    retention = test["macro_f1"] / teacher_f1 if teacher_f1 and test.get("macro_f1") is not None else None
    splits = manifest.get("splits", {})
    parity = info.get("parity", {})
    multi = task_type == "multi_label"
    # A reference member (pipeline/baselines/): a cheap alternative, not an ONNX export of the teacher.
    reference = info.get("description") if info.get("reference") else None

    lines = [
        f"# {member}: FinCompress model card",
        "",
        f"A {'multi-label' if multi else 'single-label'} text classifier over {len(names)} classes "
        f"({', '.join(names)}): the `{member}` member of a FinCompress model family, "
        + (f"a reference member: {reference}." if reference else "exported to ONNX."),
        "",
        "## The model",
        "",
        "| | |",
        "|---|---|",
        f"| family member | `{member}` (built from `{info.get('source') or 'the training split'}`) |",
        f"| architecture | {reference or _architecture(config)} |",
        f"| parameters | {info.get('num_parameters', 0):,} "
        + ("(its weights) |" if reference else "(of the PyTorch model it was exported from) |"),
        f"| size of {'its weight files' if reference else 'model.onnx'} | {_f(info.get('size_mb'), 2)} MB |",
        f"| precision | {info.get('precision', 'fp32')}"
        + (f", quantized for {info['isa']}" if info.get("isa") else "") + " |",
        *([f"| INT8 variant | {variant_line(info['variant'])} |"] if info.get("variant") else []),
        f"| max sequence length | {info.get('max_length')} tokens (longer texts are truncated) |" if info.get("max_length")
        else "| max sequence length | none: every word counts |",
        *([] if reference else [f"| ONNX opset / ONNX Runtime | {info.get('opset', '?')} / {info.get('onnxruntime', '?')} |"]),
        "",
        "## Evaluation data",
        "",
        f"Source: {_source(manifest)}, split (seed {manifest.get('seed', '?')}) into "
        + ", ".join(f"{name} {split.get('rows', '?')}" for name, split in splits.items())
        + f" examples; data hash `{info.get('data_hash', manifest.get('content_hash', '?'))[:12]}`. Every "
        f"figure below is on the **test** split ({test.get('examples', '?')} examples), never used for "
        "training or model selection.",
        "",
        "## Quality on the test split",
        "",
        f"- macro-F1 **{_f(test.get('macro_f1'))}** (95% bootstrap interval [{_f(low)}, {_f(high)}]), "
        f"{'exact-match ' if multi else ''}accuracy {_f(test.get('accuracy'))}",
        f"- teacher (PyTorch fp32) macro-F1 {_f(teacher_f1)}: this model retains "
        f"{_f(retention * 100 if retention is not None else None, 1)}% of it",
        "",
        "| class | F1 |",
        "|---|---|",
        *(f"| {name} | {_f(score)} |" for name, score in per_class.items()),
        "",
        *(_chosen_section(info) if reference else [
            "## Parity with the model it was exported from",
            "",
            f"Over the test split, against {parity.get('reference', '?')}: max |logit difference| "
            f"{_f(parity.get('max_abs_logit_diff'), 6)}, label agreement {_f(parity.get('label_agreement'), 4)} "
            f"({parity.get('label_mismatches', '?')} of {parity.get('examples', '?')} differ)"
            + (f", test macro-F1 drop {_f(parity['test_macro_f1_drop'], 4)}" if "test_macro_f1_drop" in parity else "")
            + ".",
        ]),
        "",
        "## Latency",
        "",
        *_latency_section(latency, machine),
        "",
        "## How to use it",
        "",
        "Command line (" + ("numpy with scikit-learn or model2vec" if reference else "ONNX Runtime and `tokenizers` only")
        + ", no torch):",
        "",
        "```bash",
        f'python -m pipeline.export.predict --model {model_dir} --json "Operating profit rose sharply."',
        "```",
        "",
        "MLflow (when this member is the registered champion; `make serve` serves it over HTTP):",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{registered_model_name}@champion")',
        'model.predict(pd.DataFrame({"text": ["Operating profit rose sharply."]}))',
        "```",
        "",
        *([] if reference else [
            "optimum and transformers:",
            "",
            "```python",
            "from optimum.onnxruntime import ORTModelForSequenceClassification",
            "from transformers import AutoTokenizer, pipeline",
            f'model = ORTModelForSequenceClassification.from_pretrained("{model_dir}")',
            f'classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("{model_dir}"))',
            "```",
            "",
        ]),
        "## Limitations",
        "",
        f"- Evaluated on {test.get('examples', '?')} test examples only: the 95% interval is "
        f"{_f((high - low) if low is not None and high is not None else None)} wide, and differences "
        "between family members smaller than that are not significant.",
        f"- Trained and evaluated on one source ({_source(manifest)}): other domains, text "
        "styles or languages are untested. Texts longer than the max sequence length are truncated.",
    ]
    if _source(manifest).startswith("demo ") or "data/demo" in _source(manifest):
        lines.append(
            "- The bundled demo set is small and was written for this project: its figures show that the "
            "pipeline works, not how the model does on real financial text."
        )
    if multi:
        lines.append(
            "- Multi-label decisions use the per-label thresholds in config.json (`label_thresholds`); "
            "`pipeline.export.predict` and the MLflow model apply them, the transformers pipeline does not "
            "(it returns scores: compare each with its label's threshold)."
        )
    if info.get("variant", {}).get("chosen", "").startswith("fused"):
        lines.append(
            "- The fused graph uses ONNX Runtime's own operators (QAttention, EmbedLayerNormalization): it "
            "runs in ONNX Runtime only, not in other ONNX runtimes."
        )
    if info.get("isa"):
        lines.append(
            f"- INT8 kernels were chosen for {info['isa']}; on another CPU the model runs, possibly slower."
        )
    return "\n".join(lines) + "\n"


def _chosen_section(info: dict[str, Any]) -> list[str]:
    """How a reference member's classifier was chosen: its C, by validation macro-F1 (never test)."""
    scores = info.get("validation_macro_f1_by_C") or {}
    return [
        "## How it was chosen",
        "",
        f"Trained on the training split; the regularisation C = {info.get('C', '?')} had the best validation "
        "macro-F1 of " + ", ".join(f"C={c}: {_f(score)}" for c, score in scores.items()) + ".",
    ]


def card_for(
    params: Params, member_name: str, latency: dict[str, Any] | None = None, machine: dict[str, Any] | None = None
) -> str:
    """The card of the ONNX family member `member_name`, from the files the pipeline wrote."""
    member = next(m for m in family(params) if m.name == member_name)
    teacher = next(m for m in family(params) if m.name == REFERENCE)
    teacher_info_path = teacher.path / INFO_FILE
    root = params.root.resolve()
    path = member.path.resolve()
    shown_dir = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return render_card(
        member.name, shown_dir, read_json(member.path / INFO_FILE),
        read_json(member.path / "config.json") if (member.path / "config.json").is_file() else {},  # tfidf has none
        read_json(params.path(params.paths.prepared) / MANIFEST_FILE),
        read_json(teacher_info_path) if teacher_info_path.is_file() else None,
        params.report.registered_model_name, latency, machine,
    )


def write_export_cards(params: Params) -> list[Path]:
    """Write README.md into every exported ONNX member's directory; return the cards written."""
    written = []
    for member in family(params):
        if member.servable and (member.path / "model.onnx").is_file():  # the exported ONNX directories
            write_text_atomic(member.path / CARD_FILE, card_for(params, member.name))
            written.append(member.path / CARD_FILE)
    return written
