"""One log line per interval at most for something that can happen on every request or send,
with the count of what happened in between: a flood must not flood the log."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class LogThrottle:
    """Counts occurrences; ``tick`` says when a line is due and how many it stands for."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._since_line = 0
        self._line_at = -math.inf

    def tick(self) -> int | None:
        """Count one occurrence. The number of occurrences since the last line (this one
        included) when a line is due now, else None (the caller logs only then)."""
        self._since_line += 1
        now = self.clock()
        if now - self._line_at < self.interval_s:
            return None
        count, self._since_line, self._line_at = self._since_line, 0, now
        return count
