"""A set that remembers the newest ``max_size`` items, the oldest forgotten first, in O(1).

(Evicting ``next(iter(d))`` from a dict is not O(1): the deleted slots at the front of its
entries are scanned again on every call until the dict is resized, which made the limits'
fast lane quadratic once its cache was full: 13,838 events/s instead of 70,000+ on 1M events.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class RecentSet(Generic[T]):
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._members: set[T] = set()
        self._order: deque[T] = deque()

    def add(self, item: T) -> bool:
        """Remember ``item``; True if it was not remembered already."""
        if item in self._members:
            return False
        self._members.add(item)
        self._order.append(item)
        if len(self._order) > self.max_size:
            self._members.discard(self._order.popleft())
        return True

    def __contains__(self, item: object) -> bool:
        return item in self._members

    def __len__(self) -> int:
        return len(self._members)
