"""Which threshold crossings to notify: pure (the limit engine calls it with the counts it keeps).

Edge-triggered: a threshold of a key's window fires once per window start, when the key's count
in that window is at or past it; a later window fires again. What has fired is kept per key
(``fired``: the window starts and a bit per threshold, only for keys that crossed one), and is
loaded back (``restore``) from the notifications audit when a partition is assigned, so a new
owner does not notify again what the previous one did.

Percent thresholds apply to the windows that have a limit; absolute ones to their window whether
it has a limit or not. Which thresholds apply comes from the key's policy (``LimitPolicy.notify``)
or, when it has none, the global ones (``METER_NOTIFY_THRESHOLDS_*``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.bounds import next_version
from schemas.decisions import WINDOW_SECONDS, Window
from schemas.limits import LimitPolicy
from schemas.notifications import (
    Notification,
    NotifyThresholds,
    notification_id,
    percent_count,
    percent_label,
)
from worker.limits.counters import KeyWindows

WINDOWS = (Window.minute, Window.hour, Window.day)  # the order of a key's ``fired`` slots
_PLANS_MAX = 10_000  # policies whose plan is remembered


@dataclass(frozen=True, slots=True)
class Mark:
    """One threshold of one window, for one policy: fires when the count reaches ``at``."""

    at: int
    label: str
    percent: float | None


@dataclass(frozen=True, slots=True)
class Plan:
    """The thresholds of one policy, per window (ascending), and the lowest of each window."""

    marks: tuple[tuple[Mark, ...], tuple[Mark, ...], tuple[Mark, ...]]
    floor_minute: float  # the lowest threshold of each window (inf: none)
    floor_hour: float
    floor_day: float


def plan(policy: LimitPolicy, thresholds: NotifyThresholds) -> Plan:
    per_window = []
    for window in WINDOWS:
        limit = policy.limit(window)
        marks = [Mark(n, str(n), None) for n in thresholds.absolute(window)]
        if limit is not None:
            marks += [Mark(percent_count(p, limit), percent_label(p), p) for p in thresholds.percent]
        per_window.append(tuple(sorted(marks, key=lambda m: m.at)))
    m, h, d = per_window
    fm, fh, fd = (float(w[0].at) if w else math.inf for w in per_window)
    return Plan((m, h, d), fm, fh, fd)


class ThresholdTracker:
    """Fires each threshold once per key, window and window start; remembers what fired."""

    def __init__(self, default: NotifyThresholds) -> None:
        self.default = default
        # key_id -> [minute start, fired bits, hour start, fired bits, day start, fired bits]
        self.fired: dict[str, list[int]] = {}
        self._bits: dict[str, int] = {}  # threshold label -> its bit
        self._plans: dict[int, tuple[LimitPolicy, Plan]] = {}  # id(policy) -> (policy, its plan)
        self._version = 0
        self.notified = 0

    def crossed(self, key_id: str, kw: KeyWindows, policy: LimitPolicy, now: float) -> list[Notification]:
        """The notifications of thresholds ``kw``'s counts reached that have not fired yet."""
        cached = self._plans.get(id(policy))
        p = cached[1] if cached is not None and cached[0] is policy else self._plan(policy)
        if kw.minute_n < p.floor_minute and kw.hour_n < p.floor_hour and kw.day_n < p.floor_day:
            return []  # the common key: below every threshold (raw counts: a past window's are higher)
        out: list[Notification] = []
        for i, window in enumerate(WINDOWS):
            marks = p.marks[i]
            if not marks:
                continue
            count = kw.count(window, now)
            if count < marks[0].at:
                continue
            start = kw.start(window)
            state = self.fired.get(key_id)
            if state is None:
                state = self.fired[key_id] = [0, 0, 0, 0, 0, 0]
            if state[2 * i] != start:
                state[2 * i], state[2 * i + 1] = start, 0
            for mark in marks:
                if count < mark.at:
                    break
                bit = self._bit(mark.label)
                if state[2 * i + 1] & bit:
                    continue
                state[2 * i + 1] |= bit
                out.append(self._notification(key_id, kw.account, window, start, mark, policy, count, now))
        return out

    def restore(self, fired: Iterable[tuple[str, Window, int, str]]) -> None:
        """Thresholds notified already (key_id, window, window start, threshold label)."""
        for key_id, window, start, label in fired:
            i = WINDOWS.index(window)
            state = self.fired.get(key_id)
            if state is None:
                state = self.fired[key_id] = [0, 0, 0, 0, 0, 0]
            if state[2 * i] < start:
                state[2 * i], state[2 * i + 1] = start, 0
            if state[2 * i] == start:
                state[2 * i + 1] |= self._bit(label)

    def forget(self, key_ids: Iterable[str]) -> None:
        """Keys of a partition moving away: their new owner restores them from the audit."""
        for key_id in key_ids:
            self.fired.pop(key_id, None)

    def expire(self, now: float) -> int:
        """Forget keys whose fired thresholds are all of windows before today."""
        today = int(now) // WINDOW_SECONDS[Window.day] * WINDOW_SECONDS[Window.day]
        stale = [k for k, state in self.fired.items() if max(state[0], state[2], state[4]) < today]
        for k in stale:
            del self.fired[k]
        return len(stale)

    def _plan(self, policy: LimitPolicy) -> Plan:
        """Make and remember ``policy``'s plan. Cached by identity (hashing a policy costs more
        than the rest of the check): the entry holds the policy, so its id is not reused while
        cached; ``crossed`` looks it up inline."""
        if len(self._plans) >= _PLANS_MAX:
            self._plans.clear()
        made = plan(policy, policy.notify or self.default)
        self._plans[id(policy)] = (policy, made)
        return made

    def _bit(self, label: str) -> int:
        bit = self._bits.get(label)
        if bit is None:
            bit = self._bits[label] = 1 << len(self._bits)
        return bit

    def _notification(
        self,
        key_id: str,
        account: str,
        window: Window,
        start: int,
        mark: Mark,
        policy: LimitPolicy,
        count: int,
        now: float,
    ) -> Notification:
        # Rises with every notification of this worker (and with the clock across workers).
        self._version = next_version(self._version, now)
        self.notified += 1
        return Notification(
            id=notification_id(key_id, window, start, mark.label),
            key_id=key_id,
            account_id=account,
            window=window,
            window_start=datetime.fromtimestamp(start, UTC),
            window_end=datetime.fromtimestamp(start + WINDOW_SECONDS[window], UTC),
            threshold=mark.label,
            threshold_percent=mark.percent,
            threshold_count=mark.at,
            limit=policy.limit(window),
            count=count,
            version=self._version,
            decided_at=datetime.fromtimestamp(now, UTC),
        )
