"""Results of usage queries."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class Granularity(StrEnum):
    minute = "minute"
    hour = "hour"
    day = "day"


class UsagePoint(BaseModel):
    """Requests of one key in one UTC bucket."""

    model_config = ConfigDict(frozen=True)

    bucket: datetime
    requests: int
    errors: int = 0
    bytes_out: int = 0
