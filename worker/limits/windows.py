"""Fixed UTC windows, the same as the rollup buckets."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.decisions import WINDOW_SECONDS, Window

# Longest first: when several windows are exceeded, the block lasts until the latest end.
AUTOMATIC_WINDOWS = (Window.day, Window.hour, Window.minute)


def window_start(window: Window, epoch: float) -> int:
    step = WINDOW_SECONDS[window]
    return int(epoch) // step * step


def window_end(window: Window, epoch: float) -> int:
    return window_start(window, epoch) + WINDOW_SECONDS[window]


def to_datetime(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
