"""An in-memory copy of the newest part of the dedup memory, so most batches skip the
ClickHouse lookup.

A (partition, minute) is *complete* here when its partition was assigned to this worker
with no stored dedup rows for that minute, and every write to it since was ours (a
partition has one owner). For complete minutes a hash is checked here; for every other
minute (rows stored before the assignment, or forgotten to stay within the bound) the
stored dedup memory in ClickHouse is asked, as before. The store stays the truth: this is
only a faster way to get the same answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class RecentHashes:
    """Request hashes per (partition, minute) of the minutes this worker wrote from scratch,
    up to ``max_hashes`` (least recently written forgotten first)."""

    def __init__(self, max_hashes: int) -> None:
        self.max_hashes = max_hashes
        self._sets: OrderedDict[tuple[int, int], set[int]] = OrderedDict()  # least recently written first
        self._incomplete: dict[int, set[int]] = {}  # owned partition -> minutes to ask the store about
        self.size = 0

    def assign(self, partition: int, stored_minutes: Iterable[int]) -> None:
        """Own ``partition``; ``stored_minutes`` already have stored dedup rows."""
        self.revoke(partition)
        self._incomplete[partition] = set(stored_minutes)

    def revoke(self, partition: int) -> None:
        self._incomplete.pop(partition, None)
        for key in [k for k in self._sets if k[0] == partition]:
            self.size -= len(self._sets.pop(key))

    def forget_before(self, minute: int) -> None:
        """Minutes before ``minute`` (past the dedup horizon: no event of theirs is accepted any
        more) are no longer remembered as incomplete, so that record does not grow without end."""
        for p, minutes in self._incomplete.items():
            old = [m for m in minutes if m < minute]
            if old:
                self._incomplete[p] = minutes.difference(old)

    def complete(self, partition: int, minute: int) -> bool:
        incomplete = self._incomplete.get(partition)
        return incomplete is not None and minute not in incomplete

    def split(
        self, partitions: Sequence[int], minutes: Sequence[int], hashes: Sequence[int]
    ) -> tuple[set[int], dict[int, set[int]], list[int]]:
        """(hashes seen here, minutes by partition to ask the store about, hashes to ask about)."""
        seen: set[int] = set()
        ask_minutes: dict[int, set[int]] = {}
        ask: list[int] = []
        for p, m, h in zip(partitions, minutes, hashes, strict=True):
            if self.complete(p, m):
                known = self._sets.get((p, m))
                if known is not None and h in known:
                    seen.add(h)
            else:
                ask_minutes.setdefault(p, set()).add(m)
                ask.append(h)
        return seen, ask_minutes, ask

    def add(self, partitions: Sequence[int], minutes: Sequence[int], hashes: Sequence[int]) -> None:
        """Hashes whose write has landed; kept for complete minutes only."""
        for p, m, h in zip(partitions, minutes, hashes, strict=True):
            if not self.complete(p, m):
                continue
            key = (p, m)
            known = self._sets.get(key)
            if known is None:
                known = self._sets[key] = set()
            else:
                self._sets.move_to_end(key)
            if h not in known:
                known.add(h)
                self.size += 1
        while self.size > self.max_hashes and self._sets:
            (p, m), dropped = self._sets.popitem(last=False)
            self.size -= len(dropped)
            self._incomplete[p].add(m)  # forgotten: from now on the store answers for it
