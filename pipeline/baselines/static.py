"""The `static` reference member: a model2vec static embedding model distilled from the verified
teacher's encoder, with a scikit-learn LogisticRegression on its sentence embeddings (one-vs-rest for
multi-label), C chosen on validation.

model2vec encodes every token of the teacher's vocabulary once through the encoder, reduces the
vectors with PCA and weights them (SIF); a sentence is the mean of its tokens' vectors. With
`vocabulary: corpus` the teacher is first trimmed to the tokens the training and transfer texts use
(pipeline/compression/vocabulary.py, the prune stage's trim), so distillation takes seconds. The
classifier is saved as model2vec's own `StaticModelPipeline` (safetensors embeddings and head,
tokenizer.json), which runs on numpy and `tokenizers`: no torch at inference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.baselines.classifiers import STATIC, STATIC_MAX_TOKENS, write_kind
from pipeline.baselines.common import class_weights
from pipeline.config.baselines import StaticBaselineConfig
from pipeline.errors import FinCompressError

log = logging.getLogger(__name__)

class CannotDistill(FinCompressError):
    """model2vec cannot distil this teacher: the member is skipped with this reason."""


def distill(teacher_dir: Path, cfg: StaticBaselineConfig, corpus: list[str]) -> tuple[Any, dict[str, Any]]:
    """A model2vec StaticModel from the teacher's encoder; and how its vocabulary was chosen."""
    from model2vec.distill import distill_from_model

    from pipeline.compression.vocabulary import trim_vocabulary, vocabulary_trim_problem
    from pipeline.models import load_trained_with_tokenizer

    model, tokenizer = load_trained_with_tokenizer(teacher_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise CannotDistill(f"the teacher's tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer, which model2vec needs")
    info: dict[str, Any] = {"vocabulary": cfg.vocabulary, "vocab_size_before": len(tokenizer)}
    if cfg.vocabulary == "corpus":
        problem = vocabulary_trim_problem(tokenizer)
        if problem:
            log.warning("baselines.static.vocabulary=corpus: the whole vocabulary is distilled, since %s", problem)
            info["vocabulary_not_trimmed"] = problem
        else:
            model, tokenizer, trimmed = trim_vocabulary(model, tokenizer, corpus, cfg.vocab_keep_top)
            info.update(trimmed)
    try:
        # The encoder under the classification head: model2vec pools its last hidden states.
        static = distill_from_model(model=model.base_model, tokenizer=tokenizer, pca_dims=cfg.pca_dims, device="cpu")
    except Exception as error:  # model2vec and its tokenizer surgery fail in many ways on unsupported models
        log.debug("model2vec distillation failed", exc_info=True)
        raise CannotDistill(
            f"model2vec cannot distil this {model.config.model_type} teacher ({type(error).__name__}: {str(error)[:300]})"
        ) from None
    info.update(tokens=len(static.tokens), dims=int(static.dim))
    return static, info


def embed(static: Any, texts: list[str]) -> np.ndarray:
    # One process: the benchmark and the stage control the threads.
    return static.encode(texts, max_length=STATIC_MAX_TOKENS, use_multiprocessing=False)


def fit_head(
    static: Any, c_grid: list[float], train: tuple[list[str], np.ndarray], validation: tuple[list[str], np.ndarray],
    task_type: str,
) -> tuple[Any, float, dict[str, float]]:
    """One LogisticRegression per C on the train embeddings; the best on validation. Returns model2vec's
    head (softmax, or sigmoid per label), the C and every C's validation macro-F1."""
    from model2vec.inference.mlp import Activation, Layer, MLPHead
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from pipeline.baselines.common import choose_c

    x_train, x_validation = embed(static, train[0]), embed(static, validation[0])

    def fit_c(c: float) -> Any:
        regression = LogisticRegression(C=c, max_iter=2000)
        return (OneVsRestClassifier(regression) if task_type == "multi_label" else regression).fit(x_train, train[1])

    def validation_logits(classifier: Any) -> np.ndarray:
        coef, intercept = class_weights(classifier)
        return x_validation @ coef.T + intercept

    classifier, c, scores = choose_c(fit_c, validation_logits, c_grid, validation[1], task_type)
    coef, intercept = class_weights(classifier)
    activation = Activation.SIGMOID if task_type == "multi_label" else Activation.SOFTMAX
    return MLPHead(layers=[Layer(weight=coef, bias=intercept)], activation=activation), c, scores


def save(model_dir: Path, static: Any, head: Any, label_names: list[str], task_type: str) -> None:
    from model2vec.inference import StaticModelPipeline

    head.classes_ = np.asarray(label_names)
    StaticModelPipeline(static, head).save_pretrained(str(model_dir))
    write_kind(model_dir, STATIC, label_names, task_type)


