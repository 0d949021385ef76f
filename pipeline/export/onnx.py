"""Serving an exported ONNX model: ONNX Runtime sessions and `OnnxClassifier`.

An exported model is a self-contained directory: model.onnx, config.json (labels, problem type,
multi-label thresholds) and the tokenizer files, with tokenizer_config.json's model_max_length
pinned to the length the pipeline evaluates at. `OnnxClassifier` serves such a directory with
ONNX Runtime and the `tokenizers` library only: this module never imports torch or transformers,
so the predict command and the benchmark can load it into a torch-free process. Exporting and
quantizing (optimum, torch) live in `pipeline.export.onnx_export`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from pipeline.data.labels import decide, probabilities
from pipeline.errors import ModelError
from pipeline.io import dir_size_mb, read_json

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# The transformers tokenizer's "no limit" sentinel is 1e30; anything this large is not a real limit.
NO_LIMIT = 1_000_000
# What a text classifier can feed, by ONNX input name.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------- files


def onnx_size_mb(model_dir: Path) -> float:
    """Size of model.onnx plus its external data file, if any."""
    return dir_size_mb(model_dir, f"{MODEL_FILE}*")


def check_onnx_file(path: Path) -> None:
    """Check that ONNX Runtime loads the model at `path`.

    ONNX Runtime, not `onnx.checker`: the checker rejects graphs ORT runs correctly (an ORT-quantized
    DeBERTa-v2 `If` node is "not topologically sorted"). Whether such a graph computes the right thing
    is for the parity gates to judge.
    """
    if not path.is_file():
        raise ModelError(f"{path} not found; export the model first (dvc repro export_onnx)")
    create_session(path, intra_op_threads=1)


# --------------------------------------------------------------------------- inference


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 1) -> ort.SessionOptions:
    """The options every served session uses: explicit thread counts (intra_op_threads 0: every core of
    this machine) and all of ONNX Runtime's graph optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT fuses Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel took ~59 us on a
    # (1, 30, 384) input where LayerNormalization + Add take ~12 (ORT 1.32; docs/performance.md): the
    # fusion cost the pruned INT8 student a fifth of its latency. The unfused pair computes the same.
    options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    return options


def create_session(model_path: Path, intra_op_threads: int = 0, inter_op_threads: int = 1) -> ort.InferenceSession:
    """A CPU session with `session_options`."""
    options = session_options(intra_op_threads, inter_op_threads)
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's pybind errors share no useful base class
        raise ModelError(
            f"{model_path} is not a valid ONNX model (ONNX Runtime cannot load it: {str(error).strip()}); "
            "re-export the model"
        ) from None


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
    input_names: list[str] = field(init=False)  # what the session expects, in its order

    def __post_init__(self) -> None:
        self.input_names = [item.name for item in self.session.get_inputs()]
        unknown = [name for name in self.input_names if name not in TEXT_INPUTS]
        if unknown:
            raise ModelError(f"the ONNX model expects inputs {unknown}, which a text classifier does not have")

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
        inside = model_dir.resolve()
        for name in (MODEL_FILE, "config.json", TOKENIZER_FILE, "tokenizer_config.json"):
            real = (model_dir / name).resolve()
            if (model_dir / name).exists() and not real.is_relative_to(inside):
                raise ModelError(
                    f"{model_dir / name} points outside the model directory (to {real}); a model directory "
                    "must hold its own files. Copy the file in, or re-export the model with export_onnx"
                )
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
        # The parts must belong together: a foreign tokenizer gives confident wrong answers, and
        # id2label must name every output. (After the session: ONNX Runtime has checked the file.)
        import onnx

        graph = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False).graph
        rows = [int(t.dims[0]) for t in graph.initializer if "word_embeddings" in t.name and len(t.dims) == 2]
        embedding_rows = min(rows) if rows else config.get("vocab_size")
        tokens = tokenizer.get_vocab_size(with_added_tokens=True)
        if embedding_rows and tokens > embedding_rows:
            raise ModelError(
                f"{model_dir}: the tokenizer has {tokens} tokens but the model's embeddings only "
                f"{embedding_rows}: they come from different models. Re-export the directory with export_onnx"
            )
        width = session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(label_names):
            raise ModelError(
                f"{model_dir / 'config.json'}: id2label names {len(label_names)} labels but the model outputs "
                f"{width} values; config.json belongs to another model. Re-export the directory with export_onnx"
            )
        return cls(
            session, tokenizer, int(max_length), label_names, "multi_label" if multi else "single_label", thresholds
        )

    def feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """`texts` tokenized, padded and truncated into the session's inputs: ready for `session.run`."""
        encodings = self.tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(columns[name], dtype=np.int64) for name in self.input_names}

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Logits for `texts` in their order; batches sorted by length to waste little on padding."""
        out = np.empty((len(texts), len(self.label_names)), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            result = self.session.run(None, self.feed([texts[i] for i in index]))[0]
            if result.shape[-1] != out.shape[1]:  # an output width the graph did not declare
                raise ModelError(
                    f"the model outputs {result.shape[-1]} values per text but config.json's id2label names "
                    f"{out.shape[1]} labels; config.json belongs to another model. Re-export it with export_onnx"
                )
            out[index] = result
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax (single-label) or per-label sigmoid (multi-label)."""
        return probabilities(logits, self.task_type)

    def decide(self, logits: np.ndarray) -> np.ndarray:
        """Class ids (single-label) or 0/1 rows over the label thresholds (multi-label)."""
        return decide(logits, self.task_type, self.thresholds)


