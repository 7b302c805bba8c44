"""Threshold notifications: a key's count in a window crossed a threshold (e.g. 80% of its limit).

The worker that owns a key publishes one ``Notification`` per key, window (by its start) and
threshold on the notifications topic (message key = key_id); the webhook deliverer posts it
to the configured endpoints. ``id`` is the same for every copy of one crossing (a worker that
crashed between publishing and recording it publishes it again after the rebuild): receivers
deduplicate on it. An ``UndeliveredNotification`` is what the deliverer dead-letters when an
endpoint never accepted it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from schemas.bounds import PRINTABLE, Count, Identifier, Label, Note, Timestamp, TopicName, Version
from schemas.decisions import WINDOW_SECONDS, Window

Percent = Annotated[float, Field(gt=0.0, le=1_000.0)]  # of a window's limit; above 100: overshoot
MAX_THRESHOLDS = 16  # per list: a policy is a handful of thresholds, not a table
Threshold = Annotated[int, Field(ge=1, le=10**12)]  # an absolute count
AccountId = Annotated[str, StringConstraints(max_length=64, pattern=PRINTABLE)]


class NotifyThresholds(BaseModel):
    """When to notify: percentages of each window's limit (windows with a limit only) and
    absolute counts per window. An empty list means none of that kind."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    percent: tuple[Percent, ...] = Field(default=(80.0, 100.0), max_length=MAX_THRESHOLDS)
    per_minute: tuple[Threshold, ...] = Field(default=(), max_length=MAX_THRESHOLDS)
    per_hour: tuple[Threshold, ...] = Field(default=(), max_length=MAX_THRESHOLDS)
    per_day: tuple[Threshold, ...] = Field(default=(), max_length=MAX_THRESHOLDS)

    @field_validator("percent", "per_minute", "per_hour", "per_day")
    @classmethod
    def _sorted_unique(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted(set(values)))

    def absolute(self, window: Window) -> tuple[int, ...]:
        """The absolute thresholds of ``window`` (none for a manual window)."""
        return {Window.minute: self.per_minute, Window.hour: self.per_hour, Window.day: self.per_day}.get(window, ())


def percent_label(percent: float) -> str:
    """The stable name of a percent threshold: ``80%``, ``99.5%``. Not rounded (``:g`` kept 6
    digits: 99.99999 and 100 were both "100%", one fired bit and one notification id)."""
    return f"{float(percent)!r}".removesuffix(".0") + "%"


def percent_count(percent: float, limit: int) -> int:
    """The count at which ``percent`` of ``limit`` is reached (at least 1)."""
    return max(1, math.ceil(limit * percent / 100.0 - 1e-9))


def notification_id(key_id: str, window: Window, window_start: int, threshold: str) -> str:
    """The same for every copy of one crossing: (key, window, window start, threshold)."""
    digest = hashlib.sha256(f"{key_id}\x00{window.value}\x00{window_start}\x00{threshold}".encode()).hexdigest()
    return f"ntf_{digest[:32]}"


class Notification(BaseModel):
    """A key's count in one window reached a threshold. Edge-triggered: one per key, window
    start and threshold; ``id`` identifies the crossing, ``version`` rises with each
    notification a worker publishes (newer notifications of a key carry higher versions)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["threshold.crossed"] = "threshold.crossed"
    id: Identifier
    key_id: Identifier
    account_id: AccountId = ""
    window: Window
    window_start: Timestamp
    window_end: Timestamp
    threshold: Label  # "80%" (of the limit) or "4500" (an absolute count)
    threshold_percent: Percent | None = None  # set for a percent threshold
    threshold_count: Threshold  # the count the threshold stands for in this window
    limit: Count | None = None  # the window's limit (None: unlimited, absolute thresholds only)
    count: Count  # the key's count when the worker saw the crossing (>= threshold_count)
    version: Version
    decided_at: Timestamp
    source: Identifier = "worker"

    @model_validator(mode="after")
    def _consistent(self) -> Notification:
        if self.window not in WINDOW_SECONDS:  # manual, or the calendar month (no thresholds there yet)
            raise ValueError("a notification is for a minute, hour or day window")
        if (self.window_end - self.window_start).total_seconds() != WINDOW_SECONDS[self.window]:
            raise ValueError(f"window_end must be window_start + one {self.window.value}")
        if self.count < self.threshold_count:
            raise ValueError("count is below the threshold it crossed")
        return self


class UndeliveredNotification(BaseModel):
    """A notification an endpoint never accepted (dead-letter topic, message key = its id)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    notification: Notification
    endpoint: Note  # scheme, host and path only: no credentials, no query string
    reason: Note  # the last failure, e.g. "HTTP 503" or "ReadTimeout"
    attempts: Annotated[int, Field(ge=1, le=1_000)]
    failed_at: Timestamp
    topic: TopicName  # where the notification was read
    partition: Annotated[int, Field(ge=0, le=1_000_000)]
    offset: Annotated[int, Field(ge=0, le=2**63 - 1)]
