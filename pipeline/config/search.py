"""Params of the compression search (section `search`, pipeline/orchestration/search/): its goals,
budget, stopping, the short latency run of each trial and the space of configurations it explores."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from pipeline.config.base import Section, ShortLatency

Scalar = bool | int | float | str


class Range(Section):
    """A numeric search dimension: any value in [low, high] (on a grid of `step` when given, on a log
    scale when `log`)."""

    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"a range needs low < high, got low={self.low:g}, high={self.high:g}; give a fixed value for one point")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        """Written as given: without step and log when they are not set."""
        data = handler(self)
        return {key: value for key, value in data.items() if not (key == "step" and value is None or key == "log" and value is False)}


class Choices(Section):
    """A search dimension taking one of the listed values."""

    choices: list[Scalar] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, value: list[Scalar]) -> list[Scalar]:
        if len({repr(v) for v in value}) != len(value):
            raise ValueError(f"choices must be distinct, got {value}")
        return value


KD_METHODS = ("baseline", "vanilla", "intermediate")
INTEGER_DIMENSIONS = ("num_layers", "vocab_keep_top")
CATEGORICAL_DIMENSIONS = {
    "quantization": ("dynamic", "static"), "kd_method": KD_METHODS, "vocab": ("auto", "corpus", "none"),
}


class SearchSpace(Section):
    """Each dimension: a fixed value, a range {low, high[, step][, log]} or {choices: [...]}. Each maps
    onto existing params keys (pipeline/orchestration/search/), so a trial is a params override."""

    num_layers: int | Range | Choices = Choices(choices=[2, 3])  # student.num_layers
    init: str | Choices = "teacher"  # student.init (teacher | random | a model id or directory)
    heads_ratio: float | Range | Choices = Range(low=0.0, high=0.5, step=0.25)  # prune.heads_ratio
    ffn_ratio: float | Range | Choices = Range(low=0.5, high=0.75, step=0.125)  # prune.ffn_ratio
    # prune.vocab: none as the prune default (trimming to a small corpus costs F1); a size goal may want
    # {choices: [none, auto]}. vocab_keep_top only matters where the trial trims.
    vocab: str | Choices = "none"
    vocab_keep_top: int | Range | Choices = 2000  # prune.vocab_keep_top
    quantization: str | Choices = Choices(choices=["dynamic", "static"])  # export_onnx.quantization
    # Which student is pruned: baseline (labels only), vanilla or intermediate KD (prune.source).
    kd_method: str | Choices = Choices(choices=["vanilla", "intermediate"])
    alpha: float | Range | Choices = Range(low=0.5, high=0.9, step=0.1)  # distill_<method>.alpha
    temperature: float | Range | Choices = Choices(choices=[2.0, 4.0])  # distill_<method>.temperature
    hidden_weight: float | Range | Choices = 1.0  # distill_intermediate.hidden_weight
    attention_weight: float | Range | Choices = 10.0  # distill_intermediate.attention_weight

    @field_validator("*", mode="before")
    @classmethod
    def _dimension(cls, value: Any) -> Any:
        """A mapping is a range, or choices when it has `choices`: say what is wrong with that one,
        not with every member of the union."""
        if not isinstance(value, dict):
            return value
        kind = Choices if "choices" in value else Range
        try:
            return kind.model_validate(value)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                where = ".".join(str(part) for part in item["loc"])
                message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: {message}" if where else message)
            raise ValueError(f"{'{choices: [...]}' if kind is Choices else '{low, high[, step][, log]}'}: " + "; ".join(problems)) from None

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        for name in INTEGER_DIMENSIONS:
            value = getattr(self, name)
            if isinstance(value, Range) and not all(
                float(v).is_integer() for v in (value.low, value.high, value.step or 1)
            ):
                raise ValueError(f"{name}: an integer dimension needs integer low, high and step, got {value.model_dump()}")
            if isinstance(value, Choices) and not all(isinstance(v, int) and not isinstance(v, bool) for v in value.choices):
                raise ValueError(f"{name}: choices must be integers, got {value.choices}")
        for name, allowed in CATEGORICAL_DIMENSIONS.items():
            value = getattr(self, name)
            values = value.choices if isinstance(value, Choices) else [value]
            wrong = [v for v in values if v not in allowed]
            if wrong:
                raise ValueError(f"{name}: {wrong} not allowed; choose from {list(allowed)}")
        if self.vocab == "none" and not isinstance(self.vocab_keep_top, int):
            raise ValueError(
                "vocab_keep_top varies but vocab is none: no trial trims the vocabulary, so the sampler would learn "
                "from a dimension without effect; set vocab: auto (or {choices: [none, auto]}) or fix vocab_keep_top"
            )
        return self


class SearchGoals(Section):
    # null: no goal on that axis.
    min_retention: float | None = Field(0.98, gt=0, le=1.5)  # validation macro-F1 / the teacher's
    max_latency_ms: float | None = Field(2.0, gt=0)  # p50, batch 1, 1 thread
    max_size_mb: float | None = Field(None, gt=0)  # the ONNX INT8 model file


class SearchBudget(Section):
    trials: int = Field(6, ge=1)  # trials in the study in all (a resumed search continues to this)
    minutes: float = Field(15, gt=0)  # wall clock of one invocation


class SearchConfig(Section):
    goals: SearchGoals = SearchGoals()
    budget: SearchBudget = SearchBudget()
    # Once a trial meets every goal: stop after this many trials that find nothing strictly faster
    # (or as fast and smaller).
    patience: int = Field(3, ge=1)
    seed: int = 0
    sampler: Literal["tpe", "nsga2"] = "tpe"
    jobs: int = Field(1, ge=1, le=64)  # worker processes sharing the study
    study: str | None = None  # Optuna study name; null: derived from the params that shape the trials
    latency: ShortLatency = ShortLatency()  # each trial's
    space: SearchSpace = SearchSpace()
