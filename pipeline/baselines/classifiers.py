"""The reference members at inference: their torch-free classifiers, and the files their directories hold.

A reference member's directory holds its model files, `reference.json` (which kind it is, its labels,
its task type) and the checkpoint record every member has. Its classifier answers like an exported
ONNX model's (`logits`, `probabilities`, `decide`, `label_names`, `task_type`), so the predict command
and the MLflow pyfunc serve it unchanged. Inference needs numpy and scikit-learn or model2vec, never
torch. The stages' training code is in tfidf.py and static.py: the family, the benchmark and serving
import this module only, so a change to how a reference member is trained re-runs its stage, and
what comes after it only when the model it writes changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.data import labels as label_utils
from pipeline.errors import ModelError
from pipeline.io import read_json, write_json

KIND_FILE = "reference.json"


class ReferenceClassifier(ABC):
    """A reference member loaded for inference: texts in, logits out."""

    kind: ClassVar[str]  # what reference.json says, and the member kind in the family
    # The files that are its weights: their size is its size; the first must exist for it to be there.
    weight_files: ClassVar[tuple[str, ...]]
    # Libraries a served copy needs besides the ONNX model's (pipeline/export/serving.py).
    requirements: ClassVar[tuple[str, ...]] = ()

    def __init__(self, label_names: list[str], task_type: str) -> None:
        self.label_names, self.task_type = label_names, task_type
        # Both classifiers decide as they were trained to: the argmax, or a positive margin (p >= 0.5).
        self.thresholds = np.full(len(label_names), 0.5) if task_type == "multi_label" else np.asarray(0.5)

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path) -> ReferenceClassifier:
        """The classifier saved in `model_dir` by its stage."""

    @abstractmethod
    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """One row of class scores per text; `decide` turns them into labels like any member's logits."""

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return label_utils.probabilities(logits, self.task_type)

    def decide(self, logits: np.ndarray) -> np.ndarray:
        return label_utils.decide(logits, self.task_type, self.thresholds)


def write_kind(model_dir: Path, kind: str, label_names: list[str], task_type: str) -> None:
    write_json(model_dir / KIND_FILE, {"kind": kind, "label_names": label_names, "task_type": task_type})


def read_kind(model_dir: Path, kind: str) -> dict[str, Any]:
    """reference.json of `model_dir`, checked to be of `kind`."""
    path = Path(model_dir) / KIND_FILE
    if not path.is_file():
        raise ModelError(f"{path} not found: {model_dir} is not a reference member written by its stage (dvc repro)")
    info = read_json(path)
    if info.get("kind") != kind:
        raise ModelError(f"{path} describes a {info.get('kind')!r} model, not {kind!r}; re-run its stage (dvc repro)")
    return info


# --------------------------------------------------------------------------- tfidf

TFIDF = "tfidf"
TFIDF_WEIGHTS = "model.safetensors"  # the idf weights and the linear classifier
TFIDF_VECTORIZERS = "vectorizers.json"  # the vectorizers' settings and vocabularies


def features(fitted: dict[str, Any], texts: list[str]) -> Any:
    """The texts' TF-IDF rows of every vectorizer side by side (what a FeatureUnion computes)."""
    from scipy import sparse

    return sparse.hstack([vectorizer.transform(texts) for vectorizer in fitted.values()], format="csr")


def linear_scores(x: Any, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """The classifier's margins, one column per class."""
    return np.asarray(x @ coef.T + intercept, dtype=np.float32)


class TfidfClassifier(ReferenceClassifier):
    """The saved vectorizers and linear classifier, rebuilt (scikit-learn, scipy, numpy)."""

    kind = TFIDF
    weight_files = (TFIDF_WEIGHTS, TFIDF_VECTORIZERS)
    requirements = ("scikit-learn", "scipy", "safetensors")

    def __init__(self, fitted: dict[str, Any], coef: np.ndarray, intercept: np.ndarray, label_names: list[str], task_type: str) -> None:
        super().__init__(label_names, task_type)
        self.fitted, self.coef, self.intercept = fitted, coef, intercept

    @classmethod
    def load(cls, model_dir: Path) -> TfidfClassifier:
        from safetensors.numpy import load_file
        from sklearn.feature_extraction.text import TfidfVectorizer

        model_dir = Path(model_dir)
        info = read_kind(model_dir, TFIDF)
        for name in cls.weight_files:
            if not (model_dir / name).is_file():
                raise ModelError(f"{model_dir} has no {name}; re-run its stage (dvc repro baseline_tfidf)")
        tensors = load_file(str(model_dir / TFIDF_WEIGHTS))
        fitted = {}
        for name, described in read_json(model_dir / TFIDF_VECTORIZERS).items():
            settings = {**described["settings"], "ngram_range": tuple(described["settings"]["ngram_range"])}
            vectorizer = TfidfVectorizer(**settings, vocabulary=described["vocabulary"])
            vectorizer.idf_ = tensors[f"{name}.idf"].astype(np.float64)  # scikit-learn's setter for a fixed vocabulary
            fitted[name] = vectorizer
        coef, intercept = tensors["coef"], tensors["intercept"]
        width = sum(len(vectorizer.vocabulary) for vectorizer in fitted.values())
        if coef.shape[1] != width:
            raise ModelError(f"{model_dir}: the classifier has {coef.shape[1]} weights per class for {width} features; re-run its stage")
        return cls(fitted, coef, intercept, info["label_names"], info["task_type"])

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return linear_scores(features(self.fitted, texts), self.coef, self.intercept)

    def num_parameters(self) -> int:
        """The classifier's weights and the idf weights."""
        return int(self.coef.size + self.intercept.size + sum(len(v.vocabulary) for v in self.fitted.values()))


# --------------------------------------------------------------------------- static

STATIC = "static"
STATIC_EMBEDDINGS = "model.safetensors"  # the static token vectors
STATIC_HEAD = "head.safetensors"  # the classifier (model2vec's head format)
STATIC_MAX_TOKENS = 512  # model2vec's encode truncates texts to this many tokens


class StaticClassifier(ReferenceClassifier):
    """model2vec's StaticModelPipeline (numpy, `tokenizers`, safetensors)."""

    kind = STATIC
    weight_files = (STATIC_EMBEDDINGS, STATIC_HEAD)
    requirements = ("model2vec", "safetensors")

    def __init__(self, pipeline: Any, label_names: list[str], task_type: str) -> None:
        super().__init__(label_names, task_type)
        self.pipeline = pipeline

    @classmethod
    def load(cls, model_dir: Path) -> StaticClassifier:
        from model2vec.inference import StaticModelPipeline

        model_dir = Path(model_dir)
        info = read_kind(model_dir, STATIC)
        for name in (*cls.weight_files, "tokenizer.json", "config.json"):
            if not (model_dir / name).is_file():
                raise ModelError(f"{model_dir} has no {name}; re-run its stage (dvc repro baseline_static)")
        return cls(StaticModelPipeline.from_pretrained(model_dir), info["label_names"], info["task_type"])

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """The head's probabilities as logits (model2vec's public API gives probabilities): log p for
        softmax, log(p / (1 - p)) for sigmoid, so `probabilities` gives p back and `decide` its labels."""
        proba = self.pipeline.predict_proba(texts, max_length=STATIC_MAX_TOKENS, use_multiprocessing=False)
        p = np.clip(np.asarray(proba, np.float64), 1e-7, 1 - 1e-7)
        return (np.log(p) - np.log1p(-p) if self.task_type == "multi_label" else np.log(p)).astype(np.float32)

    def num_parameters(self) -> int:
        """The token embeddings and the head's weights."""
        return int(self.pipeline.model.embedding.size + sum(layer.weight.size + layer.bias.size for layer in self.pipeline.head.layers))


# --------------------------------------------------------------------------- loading any of them

CLASSIFIERS: dict[str, type[ReferenceClassifier]] = {cls.kind: cls for cls in (TfidfClassifier, StaticClassifier)}


def is_reference(model_dir: Path) -> bool:
    """True for a directory a reference member's stage wrote (it has reference.json)."""
    return (Path(model_dir) / KIND_FILE).is_file()


def load_reference(model_dir: Path) -> ReferenceClassifier:
    """The reference member in `model_dir`, whichever kind reference.json names."""
    kind = read_json(Path(model_dir) / KIND_FILE).get("kind")
    if kind not in CLASSIFIERS:
        raise ModelError(f"{Path(model_dir) / KIND_FILE} names a kind {kind!r} this version cannot load ({sorted(CLASSIFIERS)})")
    return CLASSIFIERS[kind].load(model_dir)
