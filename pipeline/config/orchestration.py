"""Params of running the pipeline rather than of any model: MLflow `tracking` and the Prefect `flow`."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section


class TrackingConfig(Section):
    experiment: str = Field("fincompress", min_length=1, pattern=r"\S")


class FlowConfig(Section):
    retries: int = Field(1, ge=0, le=10)
    retry_delay_seconds: float = Field(10, ge=0)
