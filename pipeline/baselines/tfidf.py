"""The `tfidf` reference member: scikit-learn TF-IDF of word and character n-grams and a LinearSVC
(one-vs-rest for multi-label), C chosen on validation. It needs no teacher.

Saved without pickle: each vectorizer's settings and vocabulary as JSON, its idf weights and the
classifier's coefficients as safetensors, and rebuilt into the same scikit-learn vectorizers on load.
(skops would be the usual safe format, but importing skops.io imports torch through scikit-learn's
estimator discovery, and a reference member must load into a torch-free process like an ONNX one.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.baselines.classifiers import (
    TFIDF,
    TFIDF_VECTORIZERS,
    TFIDF_WEIGHTS,
    features,
    linear_scores,
    write_kind,
)
from pipeline.baselines.common import class_weights
from pipeline.config.baselines import TfidfBaselineConfig
from pipeline.io import write_json

# The vectorizer settings that are saved; the rest stay scikit-learn's defaults on both sides.
SAVED_SETTINGS = ("analyzer", "ngram_range", "lowercase", "min_df", "sublinear_tf", "norm", "use_idf", "smooth_idf")


def vectorizers(cfg: TfidfBaselineConfig) -> dict[str, Any]:
    """The unfitted vectorizers by name: word n-grams and char_wb n-grams, as configured."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    found = {}
    if cfg.word_ngrams is not None:
        found["word"] = TfidfVectorizer(analyzer="word", ngram_range=tuple(cfg.word_ngrams), min_df=cfg.min_df, sublinear_tf=True)
    if cfg.char_ngrams is not None:
        found["char"] = TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(cfg.char_ngrams), min_df=cfg.min_df, sublinear_tf=True)
    return found


def fit(
    cfg: TfidfBaselineConfig, train: tuple[list[str], np.ndarray], validation: tuple[list[str], np.ndarray], task_type: str
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit the vectorizers and one classifier per C on train, keep the C best on validation.
    Returns the fitted vectorizers, coef, intercept and what was chosen."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    from pipeline.baselines.common import choose_c

    fitted = {name: vectorizer.fit(train[0]) for name, vectorizer in vectorizers(cfg).items()}
    x_train = features(fitted, train[0])
    x_validation = features(fitted, validation[0])

    def fit_c(c: float) -> Any:
        svm = LinearSVC(C=c, random_state=0)
        return (OneVsRestClassifier(svm) if task_type == "multi_label" else svm).fit(x_train, train[1])

    def validation_logits(classifier: Any) -> np.ndarray:
        return linear_scores(x_validation, *class_weights(classifier))

    classifier, c, scores = choose_c(fit_c, validation_logits, cfg.c_grid, validation[1], task_type)
    coef, intercept = class_weights(classifier)
    chosen = {"C": c, "validation_macro_f1_by_C": scores, "features": {name: len(v.vocabulary_) for name, v in fitted.items()}}
    return fitted, coef, intercept, chosen


def save(
    model_dir: Path, fitted: dict[str, Any], coef: np.ndarray, intercept: np.ndarray, label_names: list[str], task_type: str
) -> None:
    from safetensors.numpy import save_file

    tensors = {"coef": coef, "intercept": intercept}
    described = {}
    for name, vectorizer in fitted.items():
        tensors[f"{name}.idf"] = vectorizer.idf_.astype(np.float32)
        settings = {key: vectorizer.get_params()[key] for key in SAVED_SETTINGS}
        vocabulary = {term: int(index) for term, index in vectorizer.vocabulary_.items()}
        described[name] = {"settings": settings, "vocabulary": vocabulary}
    save_file(tensors, str(model_dir / TFIDF_WEIGHTS))
    write_json(model_dir / TFIDF_VECTORIZERS, described)
    write_kind(model_dir, TFIDF, label_names, task_type)


