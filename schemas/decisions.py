"""Block / unblock decisions pushed from the workers to every API node."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from schemas.bounds import Count, Identifier, Note, Timestamp, Version


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


class DecisionAction(StrEnum):
    block = "block"
    unblock = "unblock"


class Decision(BaseModel):
    """One transition of one key. Nodes apply it only if ``version`` is newer than what they hold."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key_id: Identifier
    action: DecisionAction
    window: Window
    limit: Count | None = None
    count: Count | None = None
    until: Timestamp | None = None
    reason: Note = ""  # operators' reasons stay in the audit; clients get a generic message
    version: Version
    decided_at: Timestamp
    source: Identifier = "worker"
    # From a shadow policy: nodes never refuse on it, they count what they would have refused.
    shadow: bool = False
