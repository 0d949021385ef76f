"""Params of measuring the family: `evaluation` (bootstrap intervals), `benchmark` and `report` (its SLA)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section


class EvaluationConfig(Section):
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class BenchmarkConfig(Section):
    # Timing is split into rounds; each round visits the members in a fresh random order. A member's
    # timing (per thread setting and mode) is done once its p50's 95% interval is within rel_ci of the
    # p50, with at least min_runs calls over min_rounds rounds, or at max_runs calls or max_seconds of
    # calls; a setting's rounds end when all its timings are done.
    rel_ci: float = Field(0.02, gt=0, lt=1)
    min_runs: int = Field(50, ge=1)
    min_rounds: int = Field(3, ge=1)
    max_runs: int = Field(5000, ge=1)
    max_seconds: float = Field(1.5, gt=0)
    round_seconds: float = Field(0.05, ge=0)  # each visit times this long (a member already stable: a quarter)
    warmup_runs: int = Field(10, ge=0)
    # Thread settings to measure; 0 means every core of this machine.
    threads: list[int] = [1, 0]
    throughput_batch_size: int = Field(32, ge=1)
    throughput_batches: int = Field(3, ge=1)
    seed: int = 0

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: list[int]) -> list[int]:
        if not value or any(t < 0 for t in value):
            raise ValueError("give one or more thread counts (0 = all cores)")
        if 1 not in value:
            raise ValueError("thread counts must include 1: the report's latency columns are at 1 thread")
        return value

    @model_validator(mode="after")
    def _runs(self) -> BenchmarkConfig:
        if self.min_runs > self.max_runs:
            raise ValueError(f"min_runs ({self.min_runs}) must not exceed max_runs ({self.max_runs})")
        return self


class SLAConfig(Section):
    max_latency_ms: float = Field(2.0, gt=0)
    min_f1_retention: float = Field(0.98, ge=0, le=1.5)


class ReportConfig(Section):
    sla: SLAConfig = SLAConfig()
    register_champion: bool = True
    registered_model_name: str = Field("fincompress-sentiment", min_length=1, pattern=r"\S")
