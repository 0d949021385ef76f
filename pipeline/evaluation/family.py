"""The model family: every member the pipeline builds, where it lives and how it runs.

Each kind of member (PyTorch fp32, PyTorch INT8, ONNX fp32, ONNX INT8 dynamic and static, and the tfidf and
static reference members) is one small class that knows
which files are its weights, its format and precision labels, whether it can be registered and served
as the champion, and how to load itself into a benchmark worker. The benchmark and the champion
choice ask the member; they never branch on its kind. Adding a backend is one subclass here (it
registers itself in `MEMBER_KINDS` under its `kind`) plus its line in `family`.

This module imports neither torch nor transformers at module level: ONNX and reference members load
into torch-free processes.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.baselines.classifiers import StaticClassifier, TfidfClassifier
from pipeline.config import Params
from pipeline.not_built import not_built_reason

REFERENCE = "teacher"  # the member speedups and retention are ratios against
# Written by export_onnx in place of a member that failed its parity gate: the member is left out.
EXCLUDED_FILE = "EXCLUDED.json"


# --------------------------------------------------------------------------- loaded members


class Runnable(ABC):
    """A member loaded for timing: turns texts into a feed its model takes, and runs a feed."""

    @abstractmethod
    def feed(self, texts: list[str]) -> Any:
        """`texts` tokenized and padded into one batch, ready for `run`."""

    @abstractmethod
    def run(self, feed: Any) -> np.ndarray:
        """One forward pass over `feed`: its logits."""

    @abstractmethod
    def use_threads(self, threads: int) -> None:
        """Run on `threads` intra-op threads from now on."""

    def inference(self) -> AbstractContextManager:
        """The context timed calls run in."""
        return contextlib.nullcontext()

    def one_thread_copies(self, count: int) -> list[Runnable]:
        """`count` independent copies of the model on one intra-op thread each, to run side by side
        (the N-sessions serving layout). Only members whose `parallel_sessions` is true have them."""
        raise NotImplementedError(f"{type(self).__name__} cannot run side-by-side copies")


class TorchRunnable(Runnable):
    def __init__(self, model: Any, tokenizer: Any, max_length: int) -> None:
        import torch

        # Possible only before torch's first parallel work: a benchmark worker loads first thing.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def feed(self, texts: list[str]) -> Any:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def run(self, feed: Any) -> np.ndarray:
        return self.model(**feed).logits.numpy()

    def use_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def inference(self) -> AbstractContextManager:
        import torch

        return torch.inference_mode()


class OnnxRunnable(Runnable):
    """One ONNX Runtime session per thread count (ORT fixes the count when it creates a session)."""

    def __init__(self, model_dir: Path, threads: list[int]) -> None:
        from pipeline.export.onnx import OnnxClassifier

        self.model_dir = model_dir
        self.classifiers = {t: OnnxClassifier.load(model_dir, intra_op_threads=t) for t in threads}
        self.current = self.classifiers[threads[0]]

    def feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.current.feed(texts)  # every session has the same tokenizer and inputs

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.current.session.run(None, feed)[0]

    def use_threads(self, threads: int) -> None:
        self.current = self.classifiers[threads]

    def one_thread_copies(self, count: int) -> list[Runnable]:
        # ONNX Runtime releases the GIL while it runs: threads of one process run the copies in parallel.
        return [OnnxRunnable(self.model_dir, [1]) for _ in range(count)]


class AlternativeRunnable(Runnable):
    """A reference member (pipeline/baselines/): one call takes texts to logits, since its featurizing
    (TF-IDF n-grams, static token lookup) is its model. Its model-only time is its end-to-end time."""

    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier

    def feed(self, texts: list[str]) -> list[str]:
        return texts

    def run(self, feed: list[str]) -> np.ndarray:
        return self.classifier.logits(feed)

    def use_threads(self, threads: int) -> None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)  # numpy's and scikit-learn's BLAS and OpenMP pools, from now on


# --------------------------------------------------------------------------- member kinds


MEMBER_KINDS: dict[str, type[Member]] = {}
"""Every member kind by its registry name (filled as the classes are defined): the benchmark worker
is told a kind's name and loads the member with its class."""


@dataclass(frozen=True)
class Member(ABC):
    """A family member: its name and directory. Subclasses say what kind of model lives there."""

    name: str
    path: Path

    kind: ClassVar[str]  # registry name: what the benchmark worker is told to load
    format: ClassVar[str]
    precision: ClassVar[str]
    weights_file: ClassVar[str]  # the file that must exist for the member to be there
    servable: ClassVar[bool] = False  # can be registered and served as the champion
    parallel_sessions: ClassVar[bool] = False  # can run as N one-thread copies side by side (Runnable.one_thread_copies)
    # A reference member: a cheap alternative to the whole family (pipeline/baselines/), measured beside
    # it. Not to be confused with REFERENCE, the teacher every ratio is taken against.
    alternative: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__ or cls.kind in MEMBER_KINDS:
            raise TypeError(f"{cls.__name__} must set a `kind` of its own (taken: {sorted(MEMBER_KINDS)})")
        MEMBER_KINDS[cls.kind] = cls

    def weight_files(self) -> list[Path]:
        """The files whose size is the member's size on disk."""
        return [self.path / self.weights_file] if self.is_present() else []

    def is_present(self) -> bool:
        return (self.path / self.weights_file).is_file()

    def excluded_reason(self) -> str | None:
        """Why the stage that builds this member left it out (a failed gate), or None."""
        path = self.path / EXCLUDED_FILE
        return json.loads(path.read_text(encoding="utf-8"))["reason"] if path.is_file() else None

    def not_built_reason(self) -> str | None:
        """Why its stage did not build this member (switched off, or it could not be built), or None."""
        return not_built_reason(self.path)

    def size_mb(self) -> float:
        return sum(path.stat().st_size for path in self.weight_files()) / 1e6

    @classmethod
    @abstractmethod
    def load_runnable(cls, model_dir: Path, max_length: int, threads: list[int]) -> Runnable:
        """Load the model in `model_dir` for timing at each of `threads` (in the benchmark worker)."""


class TorchMember(Member):
    kind = "torch"
    format = "torch"
    precision = "fp32"
    weights_file = "model.safetensors"

    @classmethod
    def load_runnable(cls, model_dir: Path, max_length: int, threads: list[int]) -> Runnable:
        from pipeline.models import load_trained_with_tokenizer

        # attn_implementation None: transformers' default, SDPA where the architecture has it (the
        # kernel a PyTorch user gets), eager otherwise (ELECTRA, MPNet, DeBERTa).
        model, tokenizer = load_trained_with_tokenizer(model_dir, attn_implementation=None)
        return TorchRunnable(model, tokenizer, max_length)


class TorchInt8Member(Member):
    kind = "torch_int8"
    format = "torch"
    precision = "int8"
    weights_file = "model_int8.safetensors"

    @classmethod
    def load_runnable(cls, model_dir: Path, max_length: int, threads: list[int]) -> Runnable:
        from pipeline.compression.quantization import load_quantized
        from pipeline.models import load_tokenizer

        # The fastest attention the architecture has, as for fp32 members.
        model = load_quantized(model_dir, attn_implementation=None)
        return TorchRunnable(model, load_tokenizer(str(model_dir)), max_length)


class OnnxMember(Member):
    """An exported ONNX fp32 model: served by the torch-free predict command, so it can be champion."""

    kind = "onnx"
    format = "onnx"
    precision = "fp32"
    weights_file = "model.onnx"
    servable = True
    parallel_sessions = True

    def weight_files(self) -> list[Path]:
        # model.onnx plus its external data file, if the model needed one.
        return sorted(self.path.glob(f"{self.weights_file}*"))

    @classmethod
    def load_runnable(cls, model_dir: Path, max_length: int, threads: list[int]) -> Runnable:
        return OnnxRunnable(model_dir, threads)  # its max_length is pinned in its tokenizer_config.json


class OnnxInt8Member(OnnxMember):
    """ONNX Runtime dynamic INT8: loads and runs like any ONNX model."""

    kind = "onnx_int8"
    precision = "int8"


class OnnxInt8StaticMember(OnnxMember):
    """ONNX Runtime static INT8 (QDQ, activation ranges calibrated on training texts)."""

    kind = "onnx_int8_static"
    precision = "int8"


class ReferenceMember:
    """What the reference members share (mixed in before Member, which registers each kind): one call
    takes text to logits (`classifier`), servable like an ONNX model."""

    classifier: Any  # TfidfClassifier or StaticClassifier
    servable = True  # served by the predict command and the MLflow pyfunc like an ONNX model
    alternative = True

    def weight_files(self) -> list[Path]:
        return [self.path / name for name in self.classifier.weight_files] if self.is_present() else []

    @classmethod
    def load_runnable(cls, model_dir: Path, max_length: int, threads: list[int]) -> Runnable:
        return AlternativeRunnable(cls.classifier.load(model_dir))


class TfidfMember(ReferenceMember, Member):
    """The `tfidf` reference member: TF-IDF n-grams + a linear classifier (scikit-learn, no torch)."""

    kind = "tfidf"
    format = "sklearn"
    precision = "fp32"
    classifier = TfidfClassifier
    weights_file = TfidfClassifier.weight_files[0]


class StaticMember(ReferenceMember, Member):
    """The `static` reference member: model2vec static embeddings of the teacher + a linear head (numpy)."""

    kind = "static"
    format = "model2vec"
    precision = "fp16"  # model2vec stores the token vectors in float16
    classifier = StaticClassifier
    weights_file = StaticClassifier.weight_files[0]


def family(params: Params) -> list[Member]:
    """Every family member in pipeline order; the PyTorch fp32 teacher (the reference) comes first, the
    reference members (cheap alternatives, not the teacher) last."""
    p = params.paths
    onnx_student = params.path(p.onnx_student)
    return [
        TorchMember(REFERENCE, params.path(p.teacher)),
        OnnxMember("teacher_onnx", params.path(p.onnx_teacher)),
        TorchMember("student_baseline", params.path(p.student_baseline)),
        TorchMember("student_vanilla", params.path(p.student_vanilla)),
        TorchMember("student_intermediate", params.path(p.student_intermediate)),
        TorchMember("student_pruned", params.path(p.pruned)),
        TorchInt8Member("student_int8_torch", params.path(p.quantized)),
        OnnxMember("student_onnx_fp32", onnx_student / "fp32"),
        OnnxInt8Member("student_onnx_int8", onnx_student / "int8"),
        OnnxInt8StaticMember("student_onnx_int8_static", onnx_student / "int8_static"),
        TfidfMember("tfidf", params.path(p.baseline_tfidf)),
        StaticMember("static", params.path(p.baseline_static)),
    ]
