"""Params of the data: the task (single- or multi-label, token length), the source and its split, and the
optional unlabelled transfer texts (sections `task`, `data`, `transfer`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section

# The bundled demo dataset (authored for this project).
DEMO_PATH = "data/demo/financial_news_sentiment.csv"
# Its unlabelled companion (1,200 sentences written for the demo's KD students: data/demo/README.md).
DEMO_TRANSFER_PATH = "data/demo/financial_news_unlabelled.txt"


class TaskConfig(Section):
    type: Literal["single_label", "multi_label"] = "single_label"
    # Tokens per text, for the teacher and every member after it (each with its tokenizer: the
    # teacher's, or a pretrained student's own): training, evaluation, export, benchmark and serving
    # all cut texts at this length.
    max_length: int = Field(128, ge=8, le=8192)
    # multi_label only: a label is predicted when its probability is at least this.
    threshold: float = Field(0.5, gt=0, lt=1)
    # multi_label only: tune one threshold per label on the validation split and save it with the model.
    tune_thresholds: bool = False
    # multi_label only: what to do when a label has no positive example in some split.
    missing_label_in_split: Literal["error", "warn"] = "error"
    # multi_label only: BCE weight of positive examples per label; `auto`: negatives / positives in
    # the training split (rare labels weigh more); `none`: 1 for every label.
    pos_weight: Literal["none", "auto"] | list[float] = "none"


class DataConfig(Section):
    source: Literal["demo", "phrasebank", "csv", "jsonl", "hub"] = "demo"
    # The input file (phrasebank/csv/jsonl), or the bundled demo CSV for `demo`. DVC tracks it as a
    # dependency, so it must be a file that exists; with `hub` it is unused (leave the default).
    path: str = DEMO_PATH
    text_column: str = "text"
    label_column: str = "label"
    # Class names in id order. null: the sorted set of labels found in the data.
    label_names: list[str] | None = ["negative", "neutral", "positive"]
    # Raw label -> class name, applied before validation (e.g. {"0": negative, bearish: negative}).
    label_map: dict[str, str] = {}
    # Labels that differ only by case, spacing or accents ('Positive' and 'positive') are an error unless
    # label_map maps them together; true keeps them as separate classes (a warning says so).
    keep_similar_labels: bool = False
    # multi_label with one column holding several labels: the separator (a JSON list also works).
    label_separator: str = ";"
    # multi_label with one 0/1 column per label: those columns (label_column is then ignored).
    label_columns: list[str] | None = None
    # hub: a Hugging Face dataset id (e.g. takala/financial_phrasebank) or a local dataset folder.
    hub_dataset: str | None = None
    hub_config: str | None = None
    # hub: which split(s) to read; null reads every split and re-splits them here.
    hub_split: str | None = None
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42

    @field_validator("label_names")
    @classmethod
    def _distinct_labels(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            if len(names) < 2:
                raise ValueError("needs at least two class names")
            if len(set(names)) != len(names):
                raise ValueError(f"class names must be distinct, got {names}")
        return names

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction >= 0.8:
            raise ValueError(
                "validation_fraction + test_fraction must be below 0.8 so training keeps most of the data"
            )
        if self.source == "hub" and not self.hub_dataset:
            raise ValueError("data.source=hub needs data.hub_dataset (a dataset id or a local dataset folder)")
        if self.source == "demo" and self.path != DEMO_PATH:
            raise ValueError(
                f"data.source=demo reads the bundled set at {DEMO_PATH}; for your own file set "
                "data.source to csv, jsonl or phrasebank"
            )
        return self


class AugmentConfig(Section):
    """New unlabelled texts made from the training and transfer texts (never validation or test), offline,
    for the teacher to label (stage augment; pipeline/data/augment.py)."""

    enabled: bool = False
    # mask: words replaced by the mask token; ngram: a contiguous run of the words; neighbours: words
    # replaced by a nearest neighbour in the teacher's input-embedding space.
    methods: list[Literal["mask", "ngram", "neighbours"]] = ["mask", "ngram", "neighbours"]
    n_per_text: int = Field(4, ge=1, le=100)  # new texts per source text (the methods taken in turn)
    max_texts: int | None = Field(20000, ge=1)  # at most this many in all; null: no cap
    mask_ratio: float = Field(0.15, gt=0, le=1)  # mask: share of the eligible words masked
    replace_ratio: float = Field(0.3, gt=0, le=1)  # neighbours: share of the eligible words replaced
    neighbours: int = Field(8, ge=1, le=100)  # neighbours: candidates per word (the top k by cosine)
    ngram_min_ratio: float = Field(0.5, gt=0, lt=1)  # ngram: the run keeps at least this share of the words
    seed: int = 0

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"give one or more distinct methods, got {value}")
        return value


class TransferConfig(Section):
    # Unlabelled in-domain texts the KD students also learn from (teacher soft targets only); null: none.
    # auto: the demo's unlabelled companion (DEMO_TRANSFER_PATH) when data is the bundled demo, else none.
    path: str | None = "auto"
    # auto: .csv -> csv, .jsonl -> jsonl, otherwise phrasebank when every line ends in @<sentiment>,
    # else one text per line. Labels in the file are ignored.
    format: Literal["auto", "text", "csv", "jsonl", "phrasebank"] = "auto"
    text_column: str = "text"  # csv/jsonl: the column with the text
    max_texts: int | None = Field(None, ge=1)  # keep at most this many (the first, in file order)
    augment: AugmentConfig = AugmentConfig()


def transfer_path(transfer: TransferConfig, data: DataConfig) -> str | None:
    """The transfer file to read: `transfer.path`, with `auto` resolved (the demo's unlabelled texts for
    the bundled demo data, none for any other data)."""
    if transfer.path != "auto":
        return transfer.path
    return DEMO_TRANSFER_PATH if data.source == "demo" else None
