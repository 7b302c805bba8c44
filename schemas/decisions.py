"""Block / unblock decisions pushed from the workers to every API node."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict


class Window(StrEnum):
    minute = "minute"
    hour = "hour"
    day = "day"
    manual = "manual"


# Fixed UTC windows: a window starts at a multiple of its length (the rollup buckets too).
WINDOW_SECONDS = {Window.minute: 60, Window.hour: 3600, Window.day: 86400}
# Longest first: when several windows are exceeded, the block lasts until the latest end.
AUTOMATIC_WINDOWS = (Window.day, Window.hour, Window.minute)


def window_start(window: Window, epoch: float) -> int:
    """Start (epoch seconds) of the fixed UTC ``window`` containing ``epoch``."""
    step = WINDOW_SECONDS[window]
    return int(epoch) // step * step


def window_end(window: Window, epoch: float) -> int:
    return window_start(window, epoch) + WINDOW_SECONDS[window]


class DecisionAction(StrEnum):
    block = "block"
    unblock = "unblock"


class Decision(BaseModel):
    """One transition of one key. Nodes apply it only if ``version`` is newer than what they hold."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key_id: str
    action: DecisionAction
    window: Window
    limit: int | None = None
    count: int | None = None
    until: AwareDatetime | None = None
    reason: str = ""
    version: int
    decided_at: AwareDatetime
    source: str = "worker"

    def retry_after_seconds(self, now: datetime) -> int:
        if self.until is None:
            return 0
        return max(0, int((self.until - now).total_seconds() + 0.999))
