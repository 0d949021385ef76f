"""Export the pruned student to ONNX (fp32), quantize it with ONNX Runtime INT8 for this CPU's
instruction set (dynamic, static with calibration on training texts, or both: export_onnx.quantization),
and export the teacher to ONNX fp32. Each output directory is self-contained
(model.onnx, config.json, tokenizer, checkpoint_info.json), so it can be served or benchmarked alone.

Parity gates over the whole test split: ONNX fp32 must match PyTorch (logits within tolerance, every
label identical); ONNX INT8 must agree with ONNX fp32 on labels and lose little macro-F1. The student's
fp32 export is the member the others are made from: when it fails its gate the stage fails and nothing
is written. Any other member that fails (an INT8 graph flipping a near-tie, the teacher's export) is
left out with its reason (its directory holds only EXCLUDED.json): the benchmark, the report and the
champion choice go on with the members that passed. In a search's view of the data, which withholds the
test split, the gates are judged on validation instead (Prepared.judged_split)."""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from pipeline import tracking
from pipeline.config import Params
from pipeline.data.labels import decide
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.errors import ConfigError, GateError, OutputError
from pipeline.evaluation.family import EXCLUDED_FILE
from pipeline.evaluation.metrics import macro_f1
from pipeline.evaluation.model_card import write_export_cards
from pipeline.evaluation.record import INFO_FILE, ModelRecord, evaluate_record
from pipeline.export.onnx import MODEL_FILE, OnnxClassifier, onnx_size_mb
from pipeline.export.onnx_export import (
    choose_int8_variant,
    export_fp32,
    fp32_parity_failures,
    fuse_attention,
    int8_parity_failures,
    logit_parity,
    quantization_operators,
    quantize_int8,
    quantize_with_fallback,
    resolve_isa,
    unsigned_weights,
)
from pipeline.export.onnx_static import calibration_sample, quantize_int8_static
from pipeline.io import OUTPUT_MARKER, atomic_dir, read_json, write_json, write_text_atomic
from pipeline.models import (
    count_parameters,
    decision_thresholds,
    load_trained_with_tokenizer,
    predict_logits,
)
from pipeline.stage import Stage

log = logging.getLogger(__name__)
NOT_EXPORTED_FILE = "NOT_EXPORTED.txt"
CALIBRATION_SEED = 0  # which training texts calibrate static INT8 when there are more than the cap


def evaluate_onnx(
    model_dir: Path, prepared: Prepared, params: Params, /, **record: Any
) -> tuple[ModelRecord, dict[str, np.ndarray], np.ndarray]:
    """Evaluate an exported directory through ONNX Runtime; returns its record (not written yet: the
    caller adds the parity checks, then writes it once), its logits per split and the decision
    thresholds of its config.json."""
    classifier = OnnxClassifier.load(model_dir)  # decides with the thresholds in its config.json
    saved, logits = evaluate_record(
        classifier.logits, prepared, params.evaluation, stage=STAGE.name,
        max_length=params.task.max_length, size_mb=onnx_size_mb(model_dir), thresholds=classifier.thresholds,
        params={"export_onnx": params.section("export_onnx")}, **record,
    )
    return saved, logits, classifier.thresholds


def export_checked(
    member: str, source: str, out_dir: Path, prepared: Prepared, params: Params
) -> tuple[ModelRecord, dict[str, np.ndarray], np.ndarray]:
    """Export the PyTorch model at `source` to ONNX fp32 in `out_dir`, evaluate it, and record its
    parity with PyTorch on the judged split, normally test (details.parity)."""
    task, max_length = params.task, params.task.max_length
    model, tokenizer = load_trained_with_tokenizer(params.path(source), prepared.label_names)  # safetensors only
    export_fp32(params.path(source), out_dir, params.export_onnx.opset, max_length)
    thresholds = decision_thresholds(model, task.threshold)
    if task.type == "multi_label":  # serve with the thresholds the pipeline evaluates with
        config = read_json(out_dir / "config.json")
        config["label_thresholds"] = np.broadcast_to(thresholds, len(prepared.label_names)).tolist()
        write_json(out_dir / "config.json", config)
    split = prepared.judged_split
    reference = predict_logits(model, tokenizer, prepared.texts(split), max_length).numpy()
    details = {"precision": "fp32", "opset": params.export_onnx.opset, "onnxruntime": onnxruntime.__version__}
    record, logits, onnx_thresholds = evaluate_onnx(
        out_dir, prepared, params, member=member, source=source, num_parameters=count_parameters(model),
        details=details,
    )
    parity = logit_parity(reference, logits[split], task.type, thresholds)
    record.details["parity"] = {"reference": "PyTorch fp32", "split": split, **parity}
    record.write(out_dir)
    return record, logits, onnx_thresholds


def gate_int8(
    member: str, what: str, int8_dir: Path, fp32: ModelRecord, fp32_dir: Path, fp32_logits: dict[str, np.ndarray],
    fp32_thresholds: np.ndarray, prepared: Prepared, params: Params, details: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """Evaluate and record the INT8 model in `int8_dir`, with its parity against ONNX fp32 on the judged
    split, normally test (details.parity); returns its metrics and its gate failures."""
    cfg, split = params.export_onnx, prepared.judged_split
    fp32_mb, int8_mb = onnx_size_mb(fp32_dir), onnx_size_mb(int8_dir)
    int8, int8_logits, _ = evaluate_onnx(
        int8_dir, prepared, params, member=member, source=f"{params.paths.onnx_student}/fp32",
        num_parameters=fp32.num_parameters,
        details={**details, "size_ratio_to_fp32": int8_mb / fp32_mb, "opset": cfg.opset, "onnxruntime": onnxruntime.__version__},
    )
    drop_key = f"{split}_macro_f1_drop"
    parity = logit_parity(fp32_logits[split], int8_logits[split], params.task.type, fp32_thresholds)
    parity[drop_key] = getattr(fp32, split)["macro_f1"] - getattr(int8, split)["macro_f1"]
    int8.details["parity"] = {"reference": "ONNX fp32", "split": split, **parity}
    int8.write(int8_dir)
    failures = int8_parity_failures(
        what, parity, parity[drop_key], cfg.min_int8_label_agreement, cfg.max_int8_f1_drop, split
    )
    log.info(
        "%s: %.2f MB (fp32 %.2f MB), label agreement %.4f, %s macro-F1 drop %.4f",
        what, int8_mb, fp32_mb, parity["label_agreement"], split, parity[drop_key],
    )
    metrics = {
        **int8.metrics(),
        "size_ratio_to_fp32": int8_mb / fp32_mb,
        "max_abs_logit_diff": parity["max_abs_logit_diff"],
        "label_agreement": parity["label_agreement"],
        drop_key: parity[drop_key],
    }
    return metrics, failures


def validation_gate(
    what: str, fp32: ModelRecord, fp32_dir: Path, fp32_logits: dict[str, np.ndarray], fp32_thresholds: np.ndarray,
    prepared: Prepared, params: Params,
) -> Callable[[np.ndarray], list[str]]:
    """The INT8 gates judged on the validation split: what the accuracy-aware fallback steers by."""
    cfg, task_type = params.export_onnx, params.task.type
    labels = prepared.labels("validation")

    def failures(logits: np.ndarray) -> list[str]:
        parity = logit_parity(fp32_logits["validation"], logits, task_type, fp32_thresholds)
        drop = fp32.validation["macro_f1"] - macro_f1(labels, decide(logits, task_type, fp32_thresholds))
        return int8_parity_failures(
            f"{what} (validation)", parity, drop, cfg.min_int8_label_agreement, cfg.max_int8_f1_drop, "validation"
        )

    return failures


def exclude(member: str, directory: Path, failures: list[str], split: str) -> str:
    """Leave a member that failed its gate out of the family: its directory keeps only EXCLUDED.json,
    saying why, with its parity figures (no model: nothing benchmarks, registers or serves it)."""
    reason = f"failed its parity gate over the {split} split: " + "; ".join(failures)
    record = read_json(directory / INFO_FILE) if (directory / INFO_FILE).is_file() else {}
    for path in directory.iterdir():
        if path.name != OUTPUT_MARKER:  # the output directory's own marker stays
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json(directory / EXCLUDED_FILE, {"member": member, "reason": reason,
                                           "parity": record.get("details", {}).get("parity")})
    log.warning("%s is left out of the family: %s", member, reason)
    return reason


def dynamic_int8_variants(
    scratch: Path, reference: tuple[Any, ...], isa: str, operators: list[str]
) -> dict[str, Any]:
    """Build each of export_onnx.int8_variants in `scratch` (dynamic INT8, with the accuracy-aware
    fallback on validation), time those passing their validation gates side by side, and choose one
    (`choose_int8_variant`). Returns what the INT8 record keeps as details.variant, plus the chosen
    model's "directory"."""
    fp32, fp32_dir, *_, prepared, params = reference
    cfg = params.export_onnx
    texts = prepared.texts("validation")
    candidates: dict[str, dict[str, Any]] = {}
    built: dict[str, Path] = {}
    default = "u8" if unsigned_weights(isa) else "s8"
    weights = [default] + (["s8"] if default == "u8" and cfg.int8_try_signed_weights else [])
    for graph in cfg.int8_variants:
        source = fp32_dir
        if graph == "fused":
            source = scratch / "fused_fp32"
            fused = fuse_attention(fp32_dir, source)
            if not fused:
                log.info("INT8 variant 'fused' skipped: ONNX Runtime's transformer optimizer fused no attention here")
                candidates[graph] = {"skipped": "not applied, no attention fused (not a BERT-like graph)"}
                continue
        for weight in weights:
            # The ISA's own weight type keeps the graph's name; s8 where the ISA's config uses u8 is "<graph>_s8".
            name = graph if weight == weights[0] else f"{graph}_{weight}"
            candidates[name] = {"fused_operators": fused} if graph == "fused" else {}
            candidates[name]["weights"] = weight
            out = built[name] = scratch / name
            quantize = functools.partial(
                quantize_int8, source, out, isa, cfg.per_channel, cfg.quantize_embeddings,
                signed_weights=weight == "s8",
            )
            candidates[name]["fallback"] = quantize_with_fallback(
                quantize, source, texts, validation_gate(f"student ONNX INT8 ({name})", *reference),
                operators, cfg.fallback_rounds, cfg.fallback_nodes_per_round,
            )
    if not built:  # only `fused` asked for, on a graph it does not apply to: the plain export it is
        raise ConfigError(
            "export_onnx.int8_variants: the only variant asked for, 'fused', does not apply to this architecture "
            "(no attention fused); add 'unfused'"
        )
    passing = [name for name in built if not candidates[name]["fallback"]["rounds"][-1]["validation_failures"]]
    timing: dict[str, Any] = {}
    if len(passing) > 1:
        timing = time_variants({name: built[name] for name in passing}, texts, params)
        for name in passing:
            candidates[name]["p50_ms"] = timing["p50_ms"][name]
    chosen = choose_int8_variant(list(built), passing, timing.get("p50_ms", {}), cfg.int8_timing_tie)
    log.info("student ONNX INT8: kept variant %r of %s (passing on validation: %s; p50 ms: %s)",
             chosen, list(built), passing, timing.get("p50_ms", "not timed"))
    return {"chosen": chosen, "candidates": candidates, "timing": timing, "directory": str(built[chosen])}


def time_variants(directories: dict[str, Path], texts: list[str], params: Params) -> dict[str, Any]:
    """Batch-1, one-thread p50 of each INT8 variant, side by side in one interleaved run (the search's
    short benchmark harness), with other processes' CPU use as it started and the machine's load average.

    Not under the benchmark lock (`quiet_machine`): the choice compares models alternated within one
    run, which a busy machine slows alike, and waiting for the lock would stall the export behind
    any other benchmark on the machine."""
    from pipeline.evaluation.family import OnnxInt8Member
    from pipeline.evaluation.latency import load_average, one_thread_latency, other_work_cores

    cfg = params.export_onnx.int8_timing
    members = [OnnxInt8Member(name, directory) for name, directory in directories.items()]
    other, before = other_work_cores(), load_average()
    timing = one_thread_latency(
        members, texts, params.task.max_length, cfg.min_runs, cfg.min_seconds, cfg.warmup_runs, cfg.rounds
    )
    return {
        "p50_ms": {name: round(result["p50"], 4) for name, result in timing.items()},
        "texts": "validation", "threads": 1, "batch_size": 1, "other_work_cores": other, "load_average": before,
        "tie": params.export_onnx.int8_timing_tie,
    }


def keep_teacher_export(teacher_out: Path) -> None:
    """With export_teacher false the stage replaces paths.onnx_teacher by a "not exported" note. DVC
    removes a stage's outputs before it runs it, so an export still there means a run by hand, usually a
    scratch export of another student: refuse rather than lose the teacher's export."""
    if (teacher_out / MODEL_FILE).is_file():
        raise OutputError(
            f"export_onnx.export_teacher is false, but {teacher_out} (paths.onnx_teacher) holds the teacher's "
            "ONNX export, which this run would replace by a 'not exported' note. For an export of another "
            "student beside the workspace's, give it its own teacher path too, e.g. "
            "paths.onnx_teacher=scratch/teacher_onnx; to drop the teacher's export, delete that directory "
            "first. Nothing was written."
        )


def run(params: Params) -> dict[str, Any]:
    """Read paths.pruned and paths.teacher; write paths.onnx_student/{fp32,int8,int8_static} (the INT8
    directories export_onnx.quantization asks for) and paths.onnx_teacher."""
    cfg, paths = params.export_onnx, params.paths
    prepared = load_prepared(params.path(paths.prepared))
    isa = resolve_isa(cfg.isa)
    student_out, teacher_out = params.path(paths.onnx_student), params.path(paths.onnx_teacher)
    if not cfg.export_teacher:
        keep_teacher_export(teacher_out)
    failures: list[str] = []  # of the student's fp32 export: fatal
    excluded: dict[str, str] = {}  # members left out, with their reason
    metrics: dict[str, Any] = {}
    # Both outputs appear together at the end, or neither does.
    with atomic_dir(student_out) as student_tmp, atomic_dir(teacher_out) as teacher_tmp:
        fp32_dir = student_tmp / "fp32"
        fp32, fp32_logits, fp32_thresholds = export_checked("student_onnx_fp32", paths.pruned, fp32_dir, prepared, params)
        fp32_parity = fp32.details["parity"]
        failures += fp32_parity_failures("student ONNX fp32", fp32_parity, cfg.max_abs_logit_diff, prepared.judged_split)
        log.info("student ONNX fp32: max |Δlogit| vs PyTorch %.2e", fp32_parity["max_abs_logit_diff"])
        metrics["student_onnx_fp32"] = {**fp32.metrics(), "max_abs_logit_diff": fp32_parity["max_abs_logit_diff"]}
        reference = (fp32, fp32_dir, fp32_logits, fp32_thresholds, prepared, params)
        operators = quantization_operators(cfg.quantize_embeddings)

        if cfg.quantization in ("dynamic", "both"):
            int8_dir = student_tmp / "int8"
            with tempfile.TemporaryDirectory(dir=student_tmp.parent) as scratch:
                variant = dynamic_int8_variants(Path(scratch), reference, isa, operators)
                shutil.move(variant.pop("directory"), int8_dir)  # the chosen variant; the others go with scratch
            fused = variant["chosen"].startswith("fused")
            metrics["student_onnx_int8"], int8_failures = gate_int8(
                "student_onnx_int8", "student ONNX INT8", int8_dir, *reference,
                details={"precision": "int8 (ONNX Runtime dynamic quantization" + (", attention fused)" if fused else ")"),
                         "isa": isa, "weights": variant["candidates"][variant["chosen"]]["weights"],
                         "per_channel": cfg.per_channel, "quantized_operators": operators,
                         "fallback": variant["candidates"][variant["chosen"]]["fallback"], "variant": variant},
            )
            if int8_failures:
                excluded["student_onnx_int8"] = exclude("student_onnx_int8", int8_dir, int8_failures, prepared.judged_split)

        if cfg.quantization in ("static", "both"):
            static_dir = student_tmp / "int8_static"
            calibration = calibration_sample(prepared.texts("train"), cfg.calibration_texts, CALIBRATION_SEED)
            fallback = quantize_with_fallback(
                lambda kept: quantize_int8_static(
                    fp32_dir, static_dir, calibration, isa, cfg.per_channel, cfg.quantize_embeddings,
                    cfg.calibration_method, kept,
                ),
                fp32_dir, prepared.texts("validation"), validation_gate("student ONNX static INT8", *reference),
                operators, cfg.fallback_rounds, cfg.fallback_nodes_per_round,
            )
            metrics["student_onnx_int8_static"], static_failures = gate_int8(
                "student_onnx_int8_static", "student ONNX static INT8", static_dir, *reference,
                details={"precision": "int8 (ONNX Runtime static quantization, QDQ)", "isa": isa,
                         "per_channel": cfg.per_channel, "quantized_operators": operators, "fallback": fallback,
                         "calibration": {"split": "train", "texts": len(calibration), "method": cfg.calibration_method}},
            )
            if static_failures:
                excluded["student_onnx_int8_static"] = exclude(
                    "student_onnx_int8_static", static_dir, static_failures, prepared.judged_split)

        if cfg.export_teacher:
            teacher, _, _ = export_checked("teacher_onnx", paths.teacher, teacher_tmp, prepared, params)
            teacher_parity = teacher.details["parity"]
            metrics["teacher_onnx"] = {**teacher.metrics(), "max_abs_logit_diff": teacher_parity["max_abs_logit_diff"]}
            teacher_failures = fp32_parity_failures("teacher ONNX fp32", teacher_parity, cfg.max_abs_logit_diff, prepared.judged_split)
            if teacher_failures:
                excluded["teacher_onnx"] = exclude("teacher_onnx", teacher_tmp, teacher_failures, prepared.judged_split)
        else:
            # DVC expects the output directory: it holds only this note (no model.onnx, no record).
            write_text_atomic(teacher_tmp / NOT_EXPORTED_FILE, "The teacher was not exported: export_onnx.export_teacher is false.\n")

        for member in excluded:
            metrics[member]["excluded"] = 1
        if failures:
            tracking.log_metrics(metrics)  # the figures stay inspectable in the FAILED run
            others = [f"{member} {reason}" for member, reason in excluded.items()]
            raise GateError(
                f"ONNX parity failed over the {prepared.judged_split} split: " + "; ".join(failures + others)
                + ". The student's fp32 export is the member the others are made from. An fp32 mismatch means "
                "the exported graph computes something else than PyTorch: try another export_onnx.opset, or "
                "raise export_onnx.max_abs_logit_diff if the difference is float noise. An INT8 shortfall: raise "
                "export_onnx.fallback_rounds (more nodes kept in fp32), try export_onnx.quantize_embeddings=false, or relax export_onnx.min_int8_label_agreement / "
                "max_int8_f1_drop if that loss is acceptable. Nothing was written."
            )

    if excluded:  # the reasons, readable in the run's tags (the metrics mark them with excluded=1)
        tracking.set_tags({f"excluded.{member}": reason for member, reason in excluded.items()})
    if "test" in prepared.evaluated_splits:  # the cards quote test figures: none in a search's view
        write_export_cards(params)  # README.md model cards, from the checkpoint_info.json just written

    for artifact_path, directory in (
        ("student_onnx_fp32", student_out / "fp32"),
        ("student_onnx_int8", student_out / "int8"),
        ("student_onnx_int8_static", student_out / "int8_static"),
        ("teacher_onnx", teacher_out),
    ):
        if (directory / INFO_FILE).is_file():  # the INT8 directories export_onnx.quantization asked for
            tracking.log_artifact(directory / INFO_FILE, artifact_path)
    return metrics


STAGE = Stage("export_onnx", run, member="student_onnx", sections=("export_onnx",),
              outputs=("onnx_student", "onnx_teacher"))

if __name__ == "__main__":
    STAGE.main()
