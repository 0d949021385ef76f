"""ONNX export (optimum), ONNX Runtime dynamic INT8 quantization, inference and parity checks.

An exported model is a self-contained directory: model.onnx, config.json (labels, problem type,
multi-label thresholds) and the tokenizer files, with tokenizer_config.json's model_max_length
pinned to the length the pipeline evaluates at. `OnnxClassifier` serves such a directory with
ONNX Runtime and the `tokenizers` library only: this module imports neither torch nor transformers
at module level (optimum is imported inside the export and quantize functions), so the predict
command and the benchmark can load it into a torch-free process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from pipeline.errors import ConfigError, ModelError
from pipeline.io import dir_size_mb, read_json, write_json
from pipeline.labels import decide, probabilities

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
ISAS = ("avx512_vnni", "avx512", "avx2", "arm64")
# The transformers tokenizer's "no limit" sentinel is 1e30; anything this large is not a real limit.
NO_LIMIT = 1_000_000
# Largest protobuf ONNX can write in one file; bigger models need external data.
PROTOBUF_LIMIT_BYTES = 2_000_000_000


# --------------------------------------------------------------------------- instruction set


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def detect_isa(machine: str | None = None, flags: set[str] | None = None) -> str:
    """The best ONNX Runtime quantization target for this CPU: avx512_vnni, avx512, avx2 or arm64."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    for flag, isa in (("avx512_vnni", "avx512_vnni"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return isa
    raise ConfigError(
        f"export_onnx.isa=auto: cannot tell which instruction sets this {machine} CPU has (no AVX2/AVX-512 "
        "flag in /proc/cpuinfo); set export_onnx.isa to avx2, avx512, avx512_vnni or arm64"
    )


def resolve_isa(setting: str) -> str:
    return detect_isa() if setting == "auto" else setting


# --------------------------------------------------------------------------- files


def onnx_size_mb(model_dir: Path) -> float:
    """Size of model.onnx plus its external data file, if any."""
    return dir_size_mb(model_dir, f"{MODEL_FILE}*")


def check_onnx_file(path: Path) -> None:
    """onnx.checker on the file by path (which also works for models over 2 GB)."""
    if not path.is_file():
        raise ModelError(f"{path} not found; export the model first (dvc repro export_onnx)")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        raise ModelError(f"{path} is not a valid ONNX model: {str(error).strip()}; re-export it") from None


def pin_max_length(model_dir: Path, max_length: int) -> None:
    """Record the evaluation length in tokenizer_config.json, where the predict command reads it."""
    path = model_dir / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    config["model_max_length"] = max_length
    write_json(path, config)


def export_fp32(source_dir: Path, out_dir: Path, opset: int, max_length: int) -> Path:
    """Export a model directory (safetensors) to `out_dir`/model.onnx with dynamic batch and sequence axes.

    Writes config.json and the tokenizer files beside it; returns the model path.
    """
    from optimum.exporters.onnx import main_export

    try:
        main_export(
            str(source_dir),
            out_dir,
            task="text-classification",
            opset=opset,
            device="cpu",
            framework="pt",
            library_name="transformers",
            local_files_only=True,
            do_validation=False,  # the stage checks parity itself, over the whole test split
        )
    except Exception as error:  # optimum raises many types for one meaning: this model did not export
        raise ModelError(
            f"{source_dir}: ONNX export failed: {type(error).__name__}: {error}. Check that the model "
            f"architecture is supported by optimum, or try another export_onnx.opset (now {opset})."
        ) from None
    if not (out_dir / TOKENIZER_FILE).is_file():
        raise ModelError(
            f"{source_dir} has no {TOKENIZER_FILE} (a fast tokenizer); the exported model needs it to be "
            "served without transformers. Save the model's tokenizer with a fast tokenizer class."
        )
    pin_max_length(out_dir, max_length)
    path = out_dir / MODEL_FILE
    check_onnx_file(path)
    return path


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    """ONNX Runtime's quantizer logs an INFO line per tensor on the root logger ("quantization
    parameters not specified": expected without calibration); keep them out of the stage's log."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)


def quantization_operators(quantize_embeddings: bool) -> list[str]:
    """ONNX Runtime's default dynamic-quantization operators; Gather (the embeddings) only when asked."""
    from optimum.onnxruntime.configuration import ORT_DEFAULT_OPS_DYNAMIC_QUANTIZATION

    operators = [op for op in ORT_DEFAULT_OPS_DYNAMIC_QUANTIZATION if op != "Gather"]
    return operators + ["Gather"] if quantize_embeddings else operators


def quantize_int8(
    fp32_dir: Path, out_dir: Path, isa: str, per_channel: bool, quantize_embeddings: bool
) -> Path:
    """ONNX Runtime dynamic INT8 of `fp32_dir`/model.onnx into `out_dir` (with config and tokenizer)."""
    from optimum.onnxruntime import AutoQuantizationConfig, ORTQuantizer

    if isa not in ISAS:
        raise ConfigError(f"export_onnx.isa={isa}: expected one of {ISAS}")
    config = getattr(AutoQuantizationConfig, isa)(
        is_static=False, per_channel=per_channel, operators_to_quantize=quantization_operators(quantize_embeddings)
    )
    quantizer = ORTQuantizer.from_pretrained(fp32_dir, file_name=MODEL_FILE)
    # Keep the weights outside the protobuf whenever the fp32 model needed to (conservative: always valid).
    external = onnx_size_mb(fp32_dir) * 1e6 >= PROTOBUF_LIMIT_BYTES
    with _root_log_level(logging.WARNING):
        quantizer.quantize(config, out_dir, file_suffix=None, use_external_data_format=external)
    path = out_dir / MODEL_FILE
    check_onnx_file(path)
    return path


# --------------------------------------------------------------------------- inference


def create_session(model_path: Path, intra_op_threads: int = 0, inter_op_threads: int = 1) -> ort.InferenceSession:
    """A CPU session with explicit thread counts (intra_op_threads 0: every core of this machine)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's pybind errors share no useful base class
        raise ModelError(f"{model_path}: ONNX Runtime cannot load it: {error}; re-export the model") from None


def _pad_id(tokenizer: Tokenizer, tokenizer_config: dict[str, Any], config: dict[str, Any]) -> int:
    """The padding token's id: the tokenizer's pad_token, else config.json's pad_token_id, else 0."""
    pad_token = tokenizer_config.get("pad_token")
    if isinstance(pad_token, dict):  # an AddedToken written out in full
        pad_token = pad_token.get("content")
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
    return pad_id if pad_id is not None else config.get("pad_token_id") or 0


@dataclass
class OnnxClassifier:
    """An exported model directory, ready to classify texts (ONNX Runtime + `tokenizers`, no torch)."""

    session: ort.InferenceSession
    tokenizer: Tokenizer
    max_length: int
    label_names: list[str]
    task_type: str  # single_label | multi_label
    thresholds: np.ndarray  # multi_label: one per label

    @classmethod
    def load(
        cls, model_dir: str | Path, intra_op_threads: int = 0, inter_op_threads: int = 1, threshold: float = 0.5
    ) -> OnnxClassifier:
        """Load `model_dir`; `threshold` applies to multi-label models whose config has no label_thresholds."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelError(f"model directory not found: {model_dir}")
        if not (model_dir / MODEL_FILE).is_file():
            raise ModelError(
                f"{model_dir} has no {MODEL_FILE}; point at a directory written by export_onnx "
                "(e.g. models/student_onnx/int8)"
            )
        for name in ("config.json", TOKENIZER_FILE):
            if not (model_dir / name).is_file():
                raise ModelError(f"{model_dir} has no {name}; re-export the model with export_onnx")
        check_onnx_file(model_dir / MODEL_FILE)
        config = read_json(model_dir / "config.json")
        id2label = config.get("id2label")
        if not id2label:
            raise ModelError(f"{model_dir / 'config.json'} has no id2label: cannot name the classes")
        label_names = [id2label[key] for key in sorted(id2label, key=int)]
        multi = config.get("problem_type") == "multi_label_classification"
        thresholds = np.asarray(config.get("label_thresholds", threshold), dtype=np.float64)
        if thresholds.ndim and thresholds.shape != (len(label_names),):
            raise ModelError(
                f"{model_dir / 'config.json'}: label_thresholds has {thresholds.size} values for "
                f"{len(label_names)} labels"
            )
        tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        tokenizer_config_path = model_dir / "tokenizer_config.json"
        tokenizer_config = read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
        max_length = tokenizer_config.get("model_max_length") or NO_LIMIT
        if max_length >= NO_LIMIT:  # no real limit recorded: the position embeddings are the limit
            max_length = config.get("max_position_embeddings", 512)
        tokenizer.enable_truncation(int(max_length))
        pad_id = _pad_id(tokenizer, tokenizer_config, config)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")
        session = create_session(model_dir / MODEL_FILE, intra_op_threads, inter_op_threads)
        return cls(
            session, tokenizer, int(max_length), label_names, "multi_label" if multi else "single_label", thresholds
        )

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Logits for `texts` in their order; batches sorted by length to waste little on padding."""
        out = np.empty((len(texts), len(self.label_names)), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        inputs = [item.name for item in self.session.get_inputs()]
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            encodings = self.tokenizer.encode_batch([texts[i] for i in index])
            columns = {
                "input_ids": [e.ids for e in encodings],
                "attention_mask": [e.attention_mask for e in encodings],
                "token_type_ids": [e.type_ids for e in encodings],
            }
            unknown = [name for name in inputs if name not in columns]
            if unknown:
                raise ModelError(f"the ONNX model expects inputs {unknown}, which a text classifier does not have")
            feed = {name: np.asarray(columns[name], dtype=np.int64) for name in inputs}
            out[index] = self.session.run(None, feed)[0]
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax (single-label) or per-label sigmoid (multi-label)."""
        return probabilities(logits, self.task_type)

    def decide(self, logits: np.ndarray) -> np.ndarray:
        """Class ids (single-label) or 0/1 rows over the label thresholds (multi-label)."""
        return decide(logits, self.task_type, self.thresholds)


# --------------------------------------------------------------------------- parity


def logit_parity(
    reference: np.ndarray, candidate: np.ndarray, task_type: str, threshold: float | np.ndarray | list[float] = 0.5
) -> dict[str, float]:
    """How far `candidate`'s logits are from `reference`'s, and how often their decisions agree."""
    same = decide(reference, task_type, threshold) == decide(candidate, task_type, threshold)
    agree = same.reshape(len(same), -1).all(axis=1)  # multi-label: the whole label set must match
    return {
        "max_abs_logit_diff": float(np.abs(np.asarray(reference) - np.asarray(candidate)).max()),
        "label_agreement": float(agree.mean()),
        "label_mismatches": int((~agree).sum()),
        "examples": int(len(agree)),
    }


def fp32_parity_failures(what: str, parity: dict[str, float], max_abs_logit_diff: float) -> list[str]:
    """The fp32 gate: logits within tolerance of PyTorch's, and every predicted label identical."""
    failures = []
    if parity["max_abs_logit_diff"] > max_abs_logit_diff:
        failures.append(
            f"{what}: max |logit difference| vs PyTorch {parity['max_abs_logit_diff']:.3g} exceeds "
            f"export_onnx.max_abs_logit_diff={max_abs_logit_diff:g}"
        )
    if parity["label_mismatches"]:
        failures.append(
            f"{what}: {parity['label_mismatches']} of {parity['examples']} test predictions differ from PyTorch's"
        )
    return failures


def int8_parity_failures(
    what: str, parity: dict[str, float], f1_drop: float, min_label_agreement: float, max_f1_drop: float
) -> list[str]:
    """The INT8 gate: labels agree with the fp32 ONNX model often enough and macro-F1 barely drops."""
    failures = []
    if parity["label_agreement"] < min_label_agreement:
        failures.append(
            f"{what}: label agreement with ONNX fp32 {parity['label_agreement']:.4f} "
            f"({parity['label_mismatches']} of {parity['examples']} differ) is below "
            f"export_onnx.min_int8_label_agreement={min_label_agreement:g}"
        )
    if f1_drop > max_f1_drop:
        failures.append(
            f"{what}: test macro-F1 drops {f1_drop:.4f} from ONNX fp32, more than "
            f"export_onnx.max_int8_f1_drop={max_f1_drop:g}"
        )
    return failures
