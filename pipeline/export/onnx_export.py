"""ONNX export (optimum) and ONNX Runtime dynamic INT8 quantization, with the parity checks that gate
them (static INT8 with calibration: pipeline/export/onnx_static.py).

This module needs optimum, and through it torch; serving an exported directory needs only
`pipeline.export.onnx` (ONNX Runtime and `tokenizers`).
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.labels import decide
from pipeline.errors import ConfigError, ModelError
from pipeline.export.onnx import MODEL_FILE, TOKENIZER_FILE, check_onnx_file, onnx_size_mb
from pipeline.io import read_json, write_json

log = logging.getLogger(__name__)
ISAS = ("avx512_vnni", "avx512", "avx2", "arm64")
# Largest protobuf ONNX can write in one file; bigger models need external data.
PROTOBUF_LIMIT_BYTES = 2_000_000_000
CALIBRATION_BATCH_SIZE = 16  # texts per batch fed to a calibrator or to the per-node error diagnosis


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


# --------------------------------------------------------------------------- export


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
    parameters not specified": expected without calibration), its transformer optimizer warnings that
    are expected here; keep them out of the stage's log."""
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


def dynamic_config(isa: str, **options: Any) -> Any:
    """optimum's dynamic INT8 config for `isa` (one of ISAS), with `options` passed to it."""
    from optimum.onnxruntime import AutoQuantizationConfig

    if isa not in ISAS:
        raise ConfigError(f"export_onnx.isa={isa}: expected one of {ISAS}")
    return getattr(AutoQuantizationConfig, isa)(is_static=False, **options)


def unsigned_weights(isa: str) -> bool:
    """Whether optimum's dynamic INT8 config for `isa` quantizes weights to u8 (its avx2 one: without
    VNNI, the u8 x s8 kernel's VPMADDUBSW can saturate its 16-bit sums)."""
    from onnxruntime.quantization import QuantType

    return dynamic_config(isa).weights_dtype == QuantType.QUInt8


def quantize_int8(
    fp32_dir: Path, out_dir: Path, isa: str, per_channel: bool, quantize_embeddings: bool,
    nodes_to_exclude: list[str] | None = None, signed_weights: bool = False,
) -> Path:
    """ONNX Runtime dynamic INT8 of `fp32_dir`/model.onnx into `out_dir` (with config and tokenizer);
    `nodes_to_exclude` stay fp32. `signed_weights`: s8 weights whatever the ISA's config uses (on AVX2
    its u8 x s8 kernel is faster than u8 x u8, and may saturate: the caller's gates judge)."""
    from onnxruntime.quantization import QuantType
    from optimum.onnxruntime import ORTQuantizer

    config = dynamic_config(
        isa, per_channel=per_channel, operators_to_quantize=quantization_operators(quantize_embeddings),
        nodes_to_exclude=nodes_to_exclude or [],
    )
    if signed_weights:
        config.weights_dtype = QuantType.QInt8
    quantizer = ORTQuantizer.from_pretrained(fp32_dir, file_name=MODEL_FILE)
    # Keep the weights outside the protobuf whenever the fp32 model needed to (conservative: always valid).
    external = onnx_size_mb(fp32_dir) * 1e6 >= PROTOBUF_LIMIT_BYTES
    with _root_log_level(logging.WARNING):
        quantizer.quantize(config, out_dir, file_suffix=None, use_external_data_format=external)
    path = out_dir / MODEL_FILE
    check_onnx_file(path)
    return path


def copy_serving_files(source_dir: Path, out_dir: Path) -> None:
    """The config and tokenizer files of `source_dir` into `out_dir`: a directory that serves on its own."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for source in source_dir.iterdir():
        if source.is_file() and not source.name.startswith(MODEL_FILE) and source.name != "checkpoint_info.json":
            shutil.copy2(source, out_dir / source.name)


# --------------------------------------------------------------------------- fusion before INT8


def fuse_attention(
    fp32_dir: Path, out_dir: Path, multi_head: bool = False, embed_layer_norm: bool = True,
    gelu_approximation: bool = False,
) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (BERT fusions) on `fp32_dir`/model.onnx, written to `out_dir`
    with the config and tokenizer; returns how many of each fused operator it made, or {} (nothing
    written) when no attention fused: the architecture's graph is not BERT-like.

    The fused Attention (one QKV MatMul, softmax and mask inside one kernel) is what dynamic INT8 then
    quantizes as QAttention: a third fewer kernels to dispatch and fewer activation quantizations.
    `multi_head` fuses MultiHeadAttention instead (Q, K, V stay MatMuls; the attention core is fp32):
    measured slower, built only by scripts/int8_variants.py for that comparison, as are `embed_layer_norm`
    false (the embeddings' Gather kept out of the fusion, for int4 embeddings) and `gelu_approximation`
    (FastGelu's tanh instead of BiasGelu's erf: measured no faster, and it moves labels)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # SkipLayerNormalization's CPU kernel is slower than the Add + LayerNormalization it replaces
    # (pipeline.export.onnx.session_options, docs/performance.md).
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    options.use_multi_head_attention = multi_head
    options.enable_embed_layer_norm = embed_layer_norm
    options.enable_gelu_approximation = gelu_approximation
    # num_heads and hidden_size 0: read per layer from each attention's Reshape, so head-pruned layers
    # fuse with their own head count (their attention is narrower than the hidden size). The optimizer
    # warns (its loggers inherit the root's level) that the detected width differs from the weights'
    # rows, which is what head pruning does.
    with _root_log_level(logging.ERROR):
        model = optimize_model(
            str(fp32_dir / MODEL_FILE), model_type="bert", num_heads=0, hidden_size=0, optimization_options=options
        )
    fused = {op: count for op, count in model.get_fused_operator_statistics().items() if count}
    if not fused.get("MultiHeadAttention" if multi_head else "Attention"):
        return {}
    copy_serving_files(fp32_dir, out_dir)
    # The quantizer needs the type of every tensor; ONNX's shape inference stops at the contrib
    # operators the fusion made, ORT's symbolic shape inference knows them.
    inferred = SymbolicShapeInference.infer_shapes(model.model, auto_merge=True)
    external = onnx_size_mb(fp32_dir) * 1e6 >= PROTOBUF_LIMIT_BYTES
    onnx.save(inferred, str(out_dir / MODEL_FILE), save_as_external_data=external)
    check_onnx_file(out_dir / MODEL_FILE)
    return fused


def choose_int8_variant(built: list[str], passing: list[str], p50_ms: dict[str, float], tie: float = 0.0) -> str:
    """The INT8 variant to keep: of those passing their validation gates, the fastest by p50, where a
    p50 within `tie` (a share) of the fastest counts as a tie and the first listed of the tied ones is
    kept (also when they were not timed); when none passes, the first built, which the gate on the
    judged split then judges as any INT8 model."""
    if not passing:
        return built[0]
    fastest = min(p50_ms.get(name, 0.0) for name in passing)
    return next(name for name in passing if p50_ms.get(name, 0.0) <= fastest * (1 + tie))


# --------------------------------------------------------------------------- accuracy-aware fallback

DIAGNOSIS_TEXTS = 64  # validation texts the per-node error is measured on


def _intermediates(model: Any, names: list[str], feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The values of tensors `names` of `model` (an onnx ModelProto, changed here) for each feed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    outputs = {output.name for output in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(names, feed) for feed in feeds]


def node_errors(
    fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]], operators: list[str], skip: list[str]
) -> dict[str, float]:
    """How much relative error each quantizable node of the fp32 graph adds in the INT8 graph: the
    relative L2 error of its output minus that of its activation input (what reached it already)."""
    import onnx

    fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    constants = {tensor.name for tensor in fp32.graph.initializer}
    weights = {t.name for t in fp32.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    in_int8 = {name for node in int8.graph.node for name in node.output}
    # The nodes with float weights (MatMul by a weight matrix, the embedding Gather): what INT8 quantizes.
    nodes = [
        n for n in fp32.graph.node
        if n.op_type in operators and n.name not in skip and n.output[0] in in_int8 and weights & set(n.input)
    ]
    # Only float activations are compared: a fused graph's EmbedLayerNormalization reads int32 token ids
    # (a tensor of unknown type counts as float: the unfused export records no intermediate types).
    types = {value.name: value.type.tensor_type.elem_type for value in fp32.graph.value_info}
    activations = {
        n.input[0] for n in nodes
        if n.input[0] in in_int8 and n.input[0] not in constants
        and types.get(n.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
    }
    names = sorted({n.output[0] for n in nodes} | activations)
    if not names:
        return {}
    reference, quantized = _intermediates(fp32, names, feeds), _intermediates(int8, names, feeds)
    error = {}
    for i, name in enumerate(names):
        diff = sum(float(np.square(r[i] - q[i]).sum()) for r, q in zip(reference, quantized, strict=True))
        norm = sum(float(np.square(r[i]).sum()) for r in reference)
        error[name] = (diff / norm) ** 0.5 if norm else 0.0
    return {n.name: error[n.output[0]] - error.get(n.input[0], 0.0) for n in nodes}


def quantize_with_fallback(
    quantize: Callable[[list[str]], Path],
    fp32_dir: Path,
    validation_texts: list[str],
    failures_of: Callable[[np.ndarray], list[str]],
    operators: list[str],
    rounds: int,
    nodes_per_round: int,
) -> dict[str, Any]:
    """Quantize; while the model fails its gate on validation (`failures_of` its validation logits) and
    rounds remain, keep the `nodes_per_round` nodes that add the most error in fp32 and quantize again.

    Validation texts only: the test split judges the result. Returns what was kept in fp32 and each
    round's size and validation failures (the caller's test-split gate still decides)."""
    from pipeline.export.onnx import OnnxClassifier

    kept: list[str] = []
    history: list[dict[str, Any]] = []
    feeds: list[dict[str, np.ndarray]] | None = None
    for round_index in range(rounds + 1):
        path = quantize(kept)
        failures = failures_of(OnnxClassifier.load(path.parent, intra_op_threads=1).logits(validation_texts))
        history.append({"kept_fp32_nodes": list(kept), "size_mb": onnx_size_mb(path.parent), "validation_failures": failures})
        if not failures or round_index == rounds:
            break
        if feeds is None:
            sample = validation_texts[:DIAGNOSIS_TEXTS]
            classifier = OnnxClassifier.load(fp32_dir, intra_op_threads=1)
            feeds = [classifier.feed(sample[i : i + CALIBRATION_BATCH_SIZE]) for i in range(0, len(sample), CALIBRATION_BATCH_SIZE)]
        errors = node_errors(fp32_dir / MODEL_FILE, path, feeds, operators, kept)
        worst = sorted(errors, key=errors.__getitem__, reverse=True)[:nodes_per_round]
        if not worst:
            break
        log.info("INT8 fails on validation (%s): keeping %s in fp32", "; ".join(failures), ", ".join(worst))
        kept += worst
    return {"kept_fp32_nodes": kept, "rounds": history}


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


def fp32_parity_failures(what: str, parity: dict[str, float], max_abs_logit_diff: float, split: str = "test") -> list[str]:
    """The fp32 gate: logits within tolerance of PyTorch's, and every predicted label identical."""
    failures = []
    if parity["max_abs_logit_diff"] > max_abs_logit_diff:
        failures.append(
            f"{what}: max |logit difference| vs PyTorch {parity['max_abs_logit_diff']:.3g} exceeds "
            f"export_onnx.max_abs_logit_diff={max_abs_logit_diff:g}"
        )
    if parity["label_mismatches"]:
        failures.append(
            f"{what}: {parity['label_mismatches']} of {parity['examples']} {split} predictions differ from PyTorch's"
        )
    return failures


def int8_parity_failures(
    what: str, parity: dict[str, float], f1_drop: float, min_label_agreement: float, max_f1_drop: float,
    split: str = "test",
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
            f"{what}: {split} macro-F1 drops {f1_drop:.4f} from ONNX fp32, more than "
            f"export_onnx.max_int8_f1_drop={max_f1_drop:g}"
        )
    return failures
