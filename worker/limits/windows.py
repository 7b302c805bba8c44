"""Fixed UTC windows, the same as the rollup buckets (defined with the decision contract)."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.decisions import AUTOMATIC_WINDOWS, window_end, window_start

__all__ = ["AUTOMATIC_WINDOWS", "to_datetime", "window_end", "window_start"]


def to_datetime(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
