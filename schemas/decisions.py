"""Block / unblock decisions pushed from the workers to every API node."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from schemas.bounds import Count, Identifier, Note, Timestamp, Version


class Window(StrEnum):
    minute = "minute"
    hour = "hour"
    day = "day"
    month = "month"  # the UTC calendar month (a quota): not fixed-length, see ``month_bounds``
    manual = "manual"


# Fixed UTC windows: a window starts at a multiple of its length (the rollup buckets too).
# The calendar month is not here (28 to 31 days): use ``window_start`` / ``window_end``.
WINDOW_SECONDS = {Window.minute: 60, Window.hour: 3600, Window.day: 86400}
# Longest first: when several windows are exceeded, the block lasts until the latest end.
AUTOMATIC_WINDOWS = (Window.month, Window.day, Window.hour, Window.minute)

_month_cache: tuple[int, int] = (0, 0)  # the last month computed: (start, end) epoch seconds


def month_bounds(epoch: float) -> tuple[int, int]:
    """(start, end) epoch seconds of the UTC calendar month containing ``epoch``; end exclusive."""
    global _month_cache
    start, end = _month_cache
    if start <= epoch < end:  # the common case: the month of the previous call
        return start, end
    at = datetime.fromtimestamp(int(epoch), UTC)
    first = datetime(at.year, at.month, 1, tzinfo=UTC)
    after = datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)
    bounds = int(first.timestamp()), int(after.timestamp())
    _month_cache = bounds
    return bounds


def window_start(window: Window, epoch: float) -> int:
    """Start (epoch seconds) of the UTC ``window`` (fixed-length or calendar month) containing ``epoch``."""
    if window is Window.month:
        return month_bounds(epoch)[0]
    step = WINDOW_SECONDS[window]
    return int(epoch) // step * step


def window_end(window: Window, epoch: float) -> int:
    """End (epoch seconds, exclusive) of the UTC ``window`` containing ``epoch`` (e.g. its start)."""
    if window is Window.month:
        return month_bounds(epoch)[1]
    step = WINDOW_SECONDS[window]
    return int(epoch) // step * step + step


def window_seconds(window: Window, epoch: float) -> int:
    """Length of the ``window`` containing ``epoch`` (a month: 28 to 31 days)."""
    if window is Window.month:
        start, end = month_bounds(epoch)
        return end - start
    return WINDOW_SECONDS[window]


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

    def blocks_at(self, epoch: float) -> bool:
        """A block in force at ``epoch`` (seconds): not yet run out, or an operator's without end."""
        return self.action is DecisionAction.block and (self.until is None or self.until.timestamp() > epoch)
