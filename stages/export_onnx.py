"""Export the pruned student to ONNX (fp32), quantize it with ONNX Runtime dynamic INT8 for this CPU's
instruction set, and export the teacher to ONNX fp32. Each output directory is self-contained
(model.onnx, config.json, tokenizer, checkpoint_info.json), so it can be served or benchmarked alone.

Parity gates over the whole test split: ONNX fp32 must match PyTorch (logits within tolerance, every
label identical); ONNX INT8 must agree with ONNX fp32 on labels and lose little macro-F1. A failed
gate fails the stage and nothing is written."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from pipeline import tracking
from pipeline.config import Params
from pipeline.data import load_manifest, load_split
from pipeline.errors import GateError
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.labels import encode
from pipeline.metrics import evaluate_logits, summary
from pipeline.models import (
    INFO_FILE,
    count_parameters,
    decision_thresholds,
    load_trained_with_tokenizer,
    predict_logits,
)
from pipeline.onnx import (
    MODEL_FILE,
    OnnxClassifier,
    export_fp32,
    fp32_parity_failures,
    int8_parity_failures,
    logit_parity,
    onnx_size_mb,
    quantization_operators,
    quantize_int8,
    resolve_isa,
)
from pipeline.stage import main

log = logging.getLogger(__name__)
STAGE = "export_onnx"
SPLITS = ("validation", "test")


@dataclass
class Evaluated:
    """One ONNX model's logits and metrics on validation and test."""

    logits: dict[str, np.ndarray]
    results: dict[str, dict[str, Any]]
    thresholds: np.ndarray  # multi-label decisions, from the model's config.json


def evaluate_onnx(model_dir: Path, rows: dict[str, list[dict]], names: list[str], params: Params) -> Evaluated:
    classifier = OnnxClassifier.load(model_dir)  # decides with the thresholds in its config.json
    logits, results = {}, {}
    for split in SPLITS:
        logits[split] = classifier.logits([row["text"] for row in rows[split]])
        labels = np.asarray([encode(row["label"], names, params.task.type) for row in rows[split]])
        results[split] = evaluate_logits(
            logits[split], labels, names, params.task.type, params.evaluation, classifier.thresholds
        )
    return Evaluated(logits, results, classifier.thresholds)


def export_checked(
    source: Path, out_dir: Path, rows: dict[str, list[dict]], names: list[str], params: Params
) -> tuple[Evaluated, dict[str, Any], int]:
    """Export `source` to ONNX fp32 in `out_dir`; return its evaluation, its parity with PyTorch on
    the test split, and the source's parameter count."""
    task, max_length = params.task, params.teacher.max_length
    model, tokenizer = load_trained_with_tokenizer(source, names)  # safetensors only
    export_fp32(source, out_dir, params.export_onnx.opset, max_length)
    thresholds = decision_thresholds(model, task.threshold)
    if task.type == "multi_label":  # serve with the thresholds the pipeline evaluates with
        config = read_json(out_dir / "config.json")
        config["label_thresholds"] = np.broadcast_to(thresholds, len(names)).tolist()
        write_json(out_dir / "config.json", config)
    texts = [row["text"] for row in rows["test"]]
    reference = predict_logits(model, tokenizer, texts, max_length).numpy()
    evaluated = evaluate_onnx(out_dir, rows, names, params)
    parity = logit_parity(reference, evaluated.logits["test"], task.type, thresholds)
    return evaluated, parity, count_parameters(model)


def checkpoint_info(
    source: str, model_dir: Path, num_parameters: int, evaluated: Evaluated, parity: dict[str, Any],
    common: dict[str, Any], **extra: Any,
) -> dict[str, Any]:
    return {
        "format": "onnx",
        **extra,
        "source": source,
        "model_file": MODEL_FILE,
        "size_mb": round(onnx_size_mb(model_dir), 3),
        "num_parameters": num_parameters,  # of the source model
        "validation": evaluated.results["validation"],
        "test": evaluated.results["test"],
        "parity": parity,
        **common,
    }


def run(params: Params) -> dict[str, Any]:
    """Read paths.pruned and paths.teacher; write paths.onnx_student/{fp32,int8} and paths.onnx_teacher."""
    cfg, paths = params.export_onnx, params.paths
    prepared = params.path(paths.prepared)
    manifest = load_manifest(prepared)
    names = manifest["label_names"]
    rows = {split: load_split(prepared, split) for split in SPLITS}
    isa = resolve_isa(cfg.isa)
    common = {
        "label_names": names,
        "task_type": params.task.type,
        "max_length": params.teacher.max_length,
        "opset": cfg.opset,
        "onnxruntime": onnxruntime.__version__,
        "params": {"export_onnx": params.section("export_onnx")},
        "data_hash": manifest["content_hash"],
    }
    student_out, teacher_out = params.path(paths.onnx_student), params.path(paths.onnx_teacher)
    failures: list[str] = []
    # Both outputs appear together at the end, or neither does.
    with atomic_dir(student_out) as student_tmp, atomic_dir(teacher_out) as teacher_tmp:
        fp32_dir, int8_dir = student_tmp / "fp32", student_tmp / "int8"
        fp32, fp32_parity, num_parameters = export_checked(params.path(paths.pruned), fp32_dir, rows, names, params)
        failures += fp32_parity_failures("student ONNX fp32", fp32_parity, cfg.max_abs_logit_diff)

        quantize_int8(fp32_dir, int8_dir, isa, cfg.per_channel, cfg.quantize_embeddings)
        int8 = evaluate_onnx(int8_dir, rows, names, params)
        int8_parity = logit_parity(fp32.logits["test"], int8.logits["test"], params.task.type, fp32.thresholds)
        int8_parity["test_macro_f1_drop"] = fp32.results["test"]["macro_f1"] - int8.results["test"]["macro_f1"]
        failures += int8_parity_failures(
            "student ONNX INT8", int8_parity, int8_parity["test_macro_f1_drop"],
            cfg.min_int8_label_agreement, cfg.max_int8_f1_drop,
        )
        fp32_mb, int8_mb = onnx_size_mb(fp32_dir), onnx_size_mb(int8_dir)
        log.info(
            "student ONNX: fp32 %.2f MB (max |Δlogit| vs PyTorch %.2e), INT8 %.2f MB for %s "
            "(label agreement %.4f, test macro-F1 drop %.4f)",
            fp32_mb, fp32_parity["max_abs_logit_diff"], int8_mb, isa, int8_parity["label_agreement"],
            int8_parity["test_macro_f1_drop"],
        )
        metrics: dict[str, Any] = {
            "onnx_fp32_size_mb": fp32_mb,
            "onnx_int8_size_mb": int8_mb,
            "int8_to_fp32_size_ratio": int8_mb / fp32_mb,
            "max_abs_logit_diff": fp32_parity["max_abs_logit_diff"],
            "int8_max_abs_logit_diff": int8_parity["max_abs_logit_diff"],
            "int8_label_agreement": int8_parity["label_agreement"],
            "int8_test_macro_f1_drop": int8_parity["test_macro_f1_drop"],
            **summary(fp32.results["validation"], "onnx_fp32_validation"),
            **summary(fp32.results["test"], "onnx_fp32_test"),
            **summary(int8.results["validation"], "onnx_int8_validation"),
            **summary(int8.results["test"], "onnx_int8_test"),
            "onnx_int8_test_macro_f1_ci95_low": int8.results["test"]["macro_f1_ci95"][0],
            "onnx_int8_test_macro_f1_ci95_high": int8.results["test"]["macro_f1_ci95"][1],
            "num_parameters": num_parameters,
        }
        infos = {
            fp32_dir: checkpoint_info(
                paths.pruned, fp32_dir, num_parameters, fp32,
                {"reference": "PyTorch fp32", "split": "test", **fp32_parity}, common, precision="fp32",
            ),
            int8_dir: checkpoint_info(
                f"{paths.onnx_student}/fp32", int8_dir, num_parameters, int8,
                {"reference": "ONNX fp32", "split": "test", **int8_parity}, common,
                precision="int8 (ONNX Runtime dynamic quantization)", isa=isa, per_channel=cfg.per_channel,
                quantized_operators=quantization_operators(cfg.quantize_embeddings),
                size_ratio_to_fp32=int8_mb / fp32_mb,
            ),
            # Written even when the teacher is not exported: DVC expects the output directory.
            teacher_tmp: {"exported": False, "reason": "export_onnx.export_teacher is false"},
        }

        if cfg.export_teacher:
            teacher, teacher_parity, teacher_parameters = export_checked(
                params.path(paths.teacher), teacher_tmp, rows, names, params
            )
            failures += fp32_parity_failures("teacher ONNX fp32", teacher_parity, cfg.max_abs_logit_diff)
            metrics.update(
                {
                    "teacher_onnx_fp32_size_mb": onnx_size_mb(teacher_tmp),
                    "teacher_max_abs_logit_diff": teacher_parity["max_abs_logit_diff"],
                    **summary(teacher.results["validation"], "teacher_onnx_fp32_validation"),
                    **summary(teacher.results["test"], "teacher_onnx_fp32_test"),
                }
            )
            infos[teacher_tmp] = checkpoint_info(
                paths.teacher, teacher_tmp, teacher_parameters, teacher,
                {"reference": "PyTorch fp32", "split": "test", **teacher_parity}, common, precision="fp32",
            )

        if failures:
            tracking.log_metrics(metrics)  # the figures stay inspectable in the FAILED run
            raise GateError(
                "ONNX parity failed over the test split: " + "; ".join(failures) + ". An fp32 mismatch means "
                "the exported graph computes something else than PyTorch: try another export_onnx.opset, or "
                "raise export_onnx.max_abs_logit_diff if the difference is float noise. An INT8 shortfall: try "
                "export_onnx.quantize_embeddings=false, or relax export_onnx.min_int8_label_agreement / "
                "max_int8_f1_drop if that loss is acceptable. Nothing was written."
            )
        for directory, info in infos.items():
            write_json(directory / INFO_FILE, info)

    for artifact_path, directory in (
        ("student_onnx_fp32", student_out / "fp32"),
        ("student_onnx_int8", student_out / "int8"),
        ("teacher_onnx", teacher_out),
    ):
        tracking.log_artifact(directory / INFO_FILE, artifact_path)
    return metrics


if __name__ == "__main__":
    main(run, stage=STAGE, member="student_onnx", sections=("export_onnx",))
