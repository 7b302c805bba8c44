"""Live window counters of the keys one worker owns, kept small (target ≤ 300 B per key)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from schemas.decisions import WINDOW_SECONDS, Window, month_bounds, window_start

_MINUTE = WINDOW_SECONDS[Window.minute]
_HOUR = WINDOW_SECONDS[Window.hour]
_DAY = WINDOW_SECONDS[Window.day]


class KeyWindows:
    """Counts of one key in its current minute, hour, day and UTC calendar month (by event time).

    ``__slots__`` and shared window-start ints keep this near 120 bytes; the key string and
    its dict entry make up the rest of the per-key cost.
    """

    __slots__ = ("account", "day", "day_n", "hour", "hour_n", "minute", "minute_n", "month", "month_n")

    def __init__(self, account: str) -> None:
        self.account = account
        self.minute = self.hour = self.day = self.month = 0
        self.minute_n = self.hour_n = self.day_n = self.month_n = 0

    def count(self, window: Window, now: float) -> int:
        """Requests in the window containing ``now`` (0 if the counter is for another window)."""
        if window is Window.minute:
            return self.minute_n if self.minute <= now < self.minute + _MINUTE else 0
        if window is Window.hour:
            return self.hour_n if self.hour <= now < self.hour + _HOUR else 0
        if window is Window.month:
            return self.month_n if self.month == month_bounds(now)[0] else 0
        return self.day_n if self.day <= now < self.day + _DAY else 0

    def start(self, window: Window) -> int:
        if window is Window.minute:
            return self.minute
        if window is Window.hour:
            return self.hour
        return self.month if window is Window.month else self.day


class WindowCounters:
    """``key_id -> KeyWindows`` for one partition."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyWindows] = {}
        self._starts: dict[int, int] = {}  # one shared int object per window start
        self._month = (0, 0)  # (start, end) of the month of the last minute counted

    def _shared(self, value: int) -> int:
        return self._starts.setdefault(value, value)

    def add(self, key_id: str, account: str, minute: int, n: int) -> KeyWindows:
        """Count ``n`` requests of ``key_id`` in the minute starting at ``minute`` (epoch seconds).

        A newer window replaces the counter; an older (late) one only reaches ClickHouse.
        """
        kw = self.keys.get(key_id)
        if kw is None:
            kw = self.keys[key_id] = KeyWindows(sys.intern(account))
        elif account != kw.account and minute >= kw.minute:
            # The node's key store owns a key's account; the newest event says what it is now
            # (a late event does not move it back, and no single event pins it).
            kw.account = sys.intern(account)
        hour = minute - minute % _HOUR
        day = minute - minute % _DAY
        month, month_end = self._month
        if not month <= minute < month_end:
            month, month_end = self._month = month_bounds(minute)
        if minute > kw.minute:
            kw.minute, kw.minute_n = self._shared(minute), n
        elif minute == kw.minute:
            kw.minute_n += n
        if hour > kw.hour:
            kw.hour, kw.hour_n = self._shared(hour), n
        elif hour == kw.hour:
            kw.hour_n += n
        if day > kw.day:
            kw.day, kw.day_n = self._shared(day), n
        elif day == kw.day:
            kw.day_n += n
        if month > kw.month:
            kw.month, kw.month_n = self._shared(month), n
        elif month == kw.month:
            kw.month_n += n
        return kw

    def set(self, key_id: str, account: str, window: Window, start: int, n: int) -> None:
        """Load a count read back from ClickHouse (rebuild after assignment)."""
        kw = self.keys.get(key_id)
        if kw is None:
            kw = self.keys[key_id] = KeyWindows(sys.intern(account))
        elif window is not Window.month:  # month rows come last: they do not move the account
            kw.account = sys.intern(account)  # the others come longest window first: the newest wins
        if window is Window.month:
            kw.month, kw.month_n = self._shared(start), n
        elif window is Window.minute:
            kw.minute, kw.minute_n = self._shared(start), n
        elif window is Window.hour:
            kw.hour, kw.hour_n = self._shared(start), n
        else:
            kw.day, kw.day_n = self._shared(start), n

    def expire(self, now: float, keep: Callable[[str, KeyWindows], bool] | None = None) -> int:
        """Forget keys with nothing in today's window, except those ``keep`` holds (a key with
        a monthly quota keeps its month count); returns how many were dropped."""
        today = window_start(Window.day, now)
        stale = [k for k, kw in self.keys.items() if kw.day < today and not (keep is not None and keep(k, kw))]
        for k in stale:
            del self.keys[k]
        oldest = min(today, month_bounds(now)[0])
        self._starts = {s: s for s in self._starts if s >= oldest}
        return len(stale)

    def __len__(self) -> int:
        return len(self.keys)
