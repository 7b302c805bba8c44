"""How far every endpoint is done with one partition of the notifications topic: its commit point.

The deliverer keeps fetching while an endpoint retries (one endpoint that keeps failing must not
hold back the others' later notifications), so deliveries end out of offset order. A partition
may be committed only up to its first offset that some endpoint has not delivered or
dead-lettered yet: a crash or a rebalance delivers the rest again (at-least-once). Pure.
"""

from __future__ import annotations

from collections import deque


class PartitionProgress:
    """The offsets of one partition handed to the endpoints, and how many deliveries each awaits."""

    def __init__(self) -> None:
        self._left: dict[int, int] = {}  # offset -> deliveries not ended yet
        self._order: deque[int] = deque()  # the offsets handed over, in order
        self._next: int | None = None  # the commit point: everything before it has ended
        self.committed: int | None = None  # the point last committed (the caller's to set)

    @property
    def held(self) -> int:
        """Offsets handed over and not passed by the commit point yet."""
        return len(self._order)

    def add(self, offset: int, deliveries: int) -> None:
        """``offset`` handed to ``deliveries`` endpoints (0: nothing to deliver, ended at once)."""
        if self._order and offset <= self._order[-1]:
            raise ValueError(f"offset {offset} handed over after {self._order[-1]}")
        self._order.append(offset)
        self._left[offset] = deliveries

    def done(self, offset: int) -> None:
        """One endpoint delivered or dead-lettered ``offset``."""
        left = self._left[offset]
        if left <= 0:
            raise ValueError(f"offset {offset}: more deliveries ended than were handed over")
        self._left[offset] = left - 1

    def commit_point(self) -> int | None:
        """The offset to commit (the first not ended, or one past the last handed over), or None
        while the first offset handed over has not ended."""
        while self._order and self._left[self._order[0]] == 0:
            offset = self._order.popleft()
            del self._left[offset]
            self._next = offset + 1
        return self._next
