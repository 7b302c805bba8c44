"""Limit policies: how many requests a key may make per fixed UTC window."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LimitPolicy(BaseModel):
    """Per-window limits; ``None`` means that window is unlimited."""

    model_config = ConfigDict(frozen=True)

    per_minute: int | None = Field(default=100, ge=0)
    per_hour: int | None = Field(default=1_000, ge=0)
    per_day: int | None = Field(default=5_000, ge=0)
