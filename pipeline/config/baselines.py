"""Params of the reference members (`baselines`): the cheapest alternatives to the compressed family,
measured beside it so the report can say what the champion buys over them. Each has its stage
(baseline_tfidf, baseline_static) and can be switched off."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section


class LinearHead(Section):
    # The regularisation grid of a linear classifier: each C is fitted on train and the one with the
    # best validation macro-F1 is kept (test is never looked at).
    c_grid: list[float] = [1.0]

    @field_validator("c_grid")
    @classmethod
    def _c_grid(cls, value: list[float]) -> list[float]:
        if not value or any(c <= 0 for c in value):
            raise ValueError("give one or more positive values of C")
        return value


class TfidfBaselineConfig(LinearHead):
    enabled: bool = True
    # TF-IDF of word n-grams and of character n-grams inside word boundaries (char_wb), side by side;
    # null leaves that half out (not both).
    word_ngrams: tuple[int, int] | None = (1, 2)
    char_ngrams: tuple[int, int] | None = (2, 5)
    # Terms in fewer training texts than this are dropped (1: keep every term).
    min_df: int = Field(1, ge=1)
    # LinearSVC's C (see LinearHead).
    c_grid: list[float] = [0.1, 0.3, 1.0, 3.0, 10.0]

    @field_validator("word_ngrams", "char_ngrams")
    @classmethod
    def _ngrams(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1]:
            raise ValueError("give [shortest, longest] n-gram lengths, 1 <= shortest <= longest")
        return value

    @model_validator(mode="after")
    def _some_features(self) -> TfidfBaselineConfig:
        if self.word_ngrams is None and self.char_ngrams is None:
            raise ValueError("word_ngrams and char_ngrams are both null: the model would have no features")
        return self


class StaticBaselineConfig(LinearHead):
    enabled: bool = True
    # model2vec PCA of the token embeddings to this many dimensions (null: keep the teacher's width;
    # larger than the width or the vocabulary: model2vec keeps what there is).
    pca_dims: int | None = Field(256, ge=2)
    # `corpus`: distil only the teacher's tokens the train and transfer texts use, plus the pieces
    # unseen words fall back to and vocab_keep_top others (seconds instead of minutes; the same trim
    # the prune stage does; tokenizers that cannot be trimmed keep their whole vocabulary, said in the
    # metrics); `model`: every token of the teacher's vocabulary.
    vocabulary: Literal["corpus", "model"] = "corpus"
    vocab_keep_top: int = Field(0, ge=0)
    # LogisticRegression's C on the static embeddings (see LinearHead).
    c_grid: list[float] = [0.1, 1.0, 10.0, 100.0]


class BaselinesConfig(Section):
    tfidf: TfidfBaselineConfig = TfidfBaselineConfig()
    static: StaticBaselineConfig = StaticBaselineConfig()
