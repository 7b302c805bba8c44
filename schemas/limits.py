"""Limit policies: how many requests a key may make per fixed UTC window."""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class LimitPolicy(BaseModel):
    """Per-window limits; ``None`` means that window is unlimited."""

    model_config = ConfigDict(frozen=True)

    per_minute: int | None = Field(default=100, ge=0)
    per_hour: int | None = Field(default=1_000, ge=0)
    per_day: int | None = Field(default=5_000, ge=0)

    @classmethod
    def unlimited(cls) -> LimitPolicy:
        return cls(per_minute=None, per_hour=None, per_day=None)


class OverrideScope(StrEnum):
    key = "key"
    account = "account"


class LimitOverride(BaseModel):
    """An operator's override for one key or one account, on the compacted limits topic.

    Message key = ``"{scope}:{subject}"``; ``policy=None`` removes the override (reset).
    """

    model_config = ConfigDict(frozen=True)

    scope: OverrideScope
    subject: str = Field(min_length=1, max_length=64)
    policy: LimitPolicy | None
    updated_at: AwareDatetime
    note: str = ""

    @property
    def topic_key(self) -> str:
        return f"{self.scope.value}:{self.subject}"
