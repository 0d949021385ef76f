"""Params of measuring the family: `evaluation` (bootstrap intervals), `benchmark` and `report` (its SLA)."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config.base import Section


class EvaluationConfig(Section):
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class BenchmarkConfig(Section):
    # Each member is timed over at least min_runs calls and at least min_seconds, after warm-up.
    min_runs: int = Field(200, ge=1)
    min_seconds: float = Field(5.0, ge=0)
    warmup_runs: int = Field(20, ge=0)
    # Timing is split into rounds; each round visits the members in a fresh random order.
    rounds: int = Field(5, ge=1)
    # Thread settings to measure; 0 means every core of this machine.
    threads: list[int] = [1, 0]
    throughput_batch_size: int = Field(32, ge=1)
    throughput_batches: int = Field(10, ge=1)
    seed: int = 0

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: list[int]) -> list[int]:
        if not value or any(t < 0 for t in value):
            raise ValueError("give one or more thread counts (0 = all cores)")
        if 1 not in value:
            raise ValueError("thread counts must include 1: the report's latency columns are at 1 thread")
        return value


class SLAConfig(Section):
    max_latency_ms: float = Field(2.0, gt=0)
    min_f1_retention: float = Field(0.98, ge=0, le=1.5)


class ReportConfig(Section):
    sla: SLAConfig = SLAConfig()
    register_champion: bool = True
    registered_model_name: str = Field("fincompress-sentiment", min_length=1, pattern=r"\S")
