"""ONNX Runtime static INT8 (QDQ): activation ranges calibrated beforehand on training texts,
tokenized as the served model tokenizes them. Why it is slower than dynamic INT8 on CPUs like this
one: docs/performance.md."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from pipeline.errors import ConfigError
from pipeline.export.onnx import MODEL_FILE, check_onnx_file, onnx_size_mb
from pipeline.export.onnx_export import (
    CALIBRATION_BATCH_SIZE,
    ISAS,
    PROTOBUF_LIMIT_BYTES,
    _root_log_level,
    copy_serving_files,
    quantization_operators,
)

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def calibration_sample(train_texts: list[str], cap: int, seed: int) -> list[str]:
    """At most `cap` training texts, a seeded random sample in their original order. Calibration sees
    training texts only: validation and test stay unseen by every choice the quantizer makes."""
    if len(train_texts) <= cap:
        return list(train_texts)
    keep = np.sort(np.random.default_rng(seed).choice(len(train_texts), size=cap, replace=False))
    return [train_texts[i] for i in keep]


class TextCalibrationReader(CalibrationDataReader):
    """Feeds the calibrator batches of texts, tokenized exactly as the served model tokenizes them."""

    def __init__(self, model_dir: Path, texts: list[str], batch_size: int = CALIBRATION_BATCH_SIZE) -> None:
        from pipeline.export.onnx import OnnxClassifier

        classifier = OnnxClassifier.load(model_dir, intra_op_threads=1)
        self.feeds = iter([classifier.feed(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantize_int8_static(
    fp32_dir: Path,
    out_dir: Path,
    calibration_texts: list[str],
    isa: str,
    per_channel: bool,
    quantize_embeddings: bool,
    method: str,
    nodes_to_exclude: list[str] | None = None,
) -> Path:
    """ONNX Runtime static INT8 (QDQ) of `fp32_dir`/model.onnx into `out_dir` (with config and tokenizer):
    activation ranges calibrated on `calibration_texts` with `method`, data types for `isa` as optimum
    chooses them for dynamic INT8; `nodes_to_exclude` stay fp32."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from optimum.onnxruntime import AutoQuantizationConfig

    if isa not in ISAS:
        raise ConfigError(f"export_onnx.isa={isa}: expected one of {ISAS}")
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"export_onnx.calibration_method={method}: expected one of {sorted(CALIBRATION_METHODS)}")
    if not calibration_texts:
        raise ConfigError("static INT8 needs calibration texts, and the training split is empty; re-run prepare_data")
    config = getattr(AutoQuantizationConfig, isa)(is_static=True, per_channel=per_channel)
    external = onnx_size_mb(fp32_dir) * 1e6 >= PROTOBUF_LIMIT_BYTES
    copy_serving_files(fp32_dir, out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        # ORT's recommended pre-processing: shapes inferred and the graph optimized, so the quantizer
        # sees the fused graph ORT runs.
        prepared = Path(scratch) / MODEL_FILE
        quant_pre_process(str(fp32_dir / MODEL_FILE), str(prepared), auto_merge=True, save_as_external_data=external)
        with _root_log_level(logging.WARNING):
            quantize_static(
                prepared,
                out_dir / MODEL_FILE,
                TextCalibrationReader(fp32_dir, calibration_texts),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=quantization_operators(quantize_embeddings),
                per_channel=per_channel,
                reduce_range=config.reduce_range,
                nodes_to_exclude=nodes_to_exclude or [],
                activation_type=config.activations_dtype,
                weight_type=config.weights_dtype,
                use_external_data_format=external,
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options={
                    "ActivationSymmetric": config.activations_symmetric,
                    "WeightSymmetric": config.weights_symmetric,
                    # Weight MatMuls only: quantizing attention's activation-by-activation MatMuls
                    # costs accuracy for little speed.
                    "MatMulConstBOnly": True,
                },
            )
    path = out_dir / MODEL_FILE
    check_onnx_file(path)
    return path
