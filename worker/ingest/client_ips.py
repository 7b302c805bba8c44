"""Distinct client addresses per key and UTC day, counted as the batches are written.

The leaked-key signal wants the keys seen from many addresses; grouping every key's
addresses at query time costs one group per active key (~0.5 M a day). The worker owns
every event of its keys, so it counts each key's distinct addresses per day here (up to a
cap) and writes a ``client_ips`` row whenever a count grows past 1, in the batch's insert:
the signal reads those few rows instead. A written count never exceeds the key's stored
addresses plus the batch's, and never falls short of them: the counts start over from the
store whenever partitions are assigned (``PartitionWriter``), so a batch given up on a
revocation cannot leave addresses counted here that no written row reflects.

Memory: most keys use one address a day, so the first one lives in two numpy arrays (16 B a
slot, open addressing); only keys with a second address get a set of fingerprints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from schemas.decisions import WINDOW_SECONDS, Window

U64 = npt.NDArray[np.uint64]

_DAY = WINDOW_SECONDS[Window.day]
_MAX_LOAD = 0.6


def fingerprints(values: Iterable[str]) -> U64:
    """64-bit fingerprints of strings (this process's ``hash``; 0 is kept for empty slots)."""
    out = np.fromiter(map(hash, values), dtype=np.int64).view(np.uint64)
    out[out == 0] = 1
    return out


class FirstAddresses:
    """Key fingerprint -> fingerprint of the first address seen, in two numpy arrays
    (linear probing, grown ×2 past 60% load). No deletion: a table lives for one day."""

    INITIAL_SLOTS = 1 << 12

    def __init__(self, slots: int = INITIAL_SLOTS) -> None:
        if slots & (slots - 1):
            raise ValueError("slots must be a power of 2")
        self.keys: U64 = np.zeros(slots, np.uint64)
        self.addresses: U64 = np.zeros(slots, np.uint64)
        self.used = 0

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.addresses.nbytes)

    def first_of(self, keys: U64, addresses: U64) -> U64:
        """Each key's first address; a key not seen before takes its address here (the first
        of its pairs in this call)."""
        if not len(keys):
            return np.zeros(0, np.uint64)
        while (self.used + len(keys)) > _MAX_LOAD * len(self.keys):
            self._grow()
        return self.addresses[self._slots(keys, addresses)]

    def _grow(self) -> None:
        full = self.keys != 0
        keys, addresses = self.keys[full], self.addresses[full]
        self.keys = np.zeros(2 * len(self.keys), np.uint64)
        self.addresses = np.zeros(len(self.keys), np.uint64)
        self.used = 0
        self._slots(keys, addresses)

    def _slots(self, keys: U64, addresses: U64) -> npt.NDArray[np.int64]:
        """The slot of each key, claiming an empty one for a new key."""
        mask = np.uint64(len(self.keys) - 1)
        position = (keys & mask).astype(np.int64)
        found = np.empty(len(keys), np.int64)
        pending = np.arange(len(keys))
        while len(pending):
            at = position[pending]
            stored = self.keys[at]
            hit = stored == keys[pending]
            found[pending[hit]] = at[hit]
            empty = stored == 0
            if empty.any():
                # Several pending keys may want one empty slot: the first takes it; the others
                # look at it again (same key: a hit; another key: probe on).
                slots, first = np.unique(at[empty], return_index=True)
                winners = pending[empty][first]
                self.keys[slots] = keys[winners]
                self.addresses[slots] = addresses[winners]
                self.used += len(slots)
            taken = ~hit & ~empty
            position[pending[taken]] = (at[taken] + 1) & (len(self.keys) - 1)
            pending = pending[~hit]
        return found


class ClientAddressCounts:
    """Distinct addresses per (key, UTC day), up to ``cap``, for the newest ``days_kept`` days.

    ``observe`` returns the (key, day) counts that grew to 2 or more: the ``client_ips`` rows
    to write with the batch. Events of older days are not counted (a key's count on such a
    day is not known here); the signal's window is the last 24 hours.
    """

    def __init__(self, cap: int, days_kept: int = 2) -> None:
        if cap < 2:
            raise ValueError("cap must be at least 2")
        self.cap = cap
        self.days_kept = days_kept
        self._first: dict[int, FirstAddresses] = {}
        self._more: dict[int, dict[str, set[int]]] = {}  # day -> key -> fingerprints (2+ addresses)

    def clear(self) -> None:
        self._first.clear()
        self._more.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the first-address tables (the sets of multi-address keys are not counted)."""
        return sum(t.nbytes for t in self._first.values())

    @property
    def multi_address_keys(self) -> int:
        return sum(len(keys) for keys in self._more.values())

    def observe(self, keys: Sequence[str], days: Sequence[int], addresses: Sequence[str]) -> dict[tuple[str, int], int]:
        """Count distinct (key, day start, address) triples; the counts of 2+ that grew."""
        grew: dict[tuple[str, int], int] = {}
        if not keys:
            return grew
        day_of = np.asarray(days, dtype=np.int64)
        key_prints, address_prints = fingerprints(keys), fingerprints(addresses)
        for day in np.unique(day_of).tolist():  # oldest first; usually one
            first = self._table(day)
            if first is None:
                continue
            rows = np.flatnonzero(day_of == day)
            firsts = first.first_of(key_prints[rows], address_prints[rows])
            more = self._more.setdefault(day, {})
            # Only the pairs whose address is not the key's first of the day get here: few.
            differ = firsts != address_prints[rows]
            for i, was_first, address in zip(
                rows[differ].tolist(), firsts[differ].tolist(), address_prints[rows[differ]].tolist(), strict=True
            ):
                key = keys[i]
                seen = more.get(key)
                if seen is None:
                    seen = more[key] = {was_first}
                if len(seen) < self.cap and address not in seen:
                    seen.add(address)
                    grew[(key, day)] = len(seen)
        return grew

    def _table(self, day: int) -> FirstAddresses | None:
        """The table of ``day``; a newer day drops the days that fell out; None: too old."""
        table = self._first.get(day)
        if table is not None:
            return table
        newest = max(self._first, default=day)
        oldest_kept = max(newest, day) - (self.days_kept - 1) * _DAY
        if day < oldest_kept:
            return None
        # Sized like the newest day's table: a day has about as many keys as the one before,
        # and growing from small re-inserts every key several times.
        slots = len(self._first[newest].keys) if newest in self._first else FirstAddresses.INITIAL_SLOTS
        for old in [d for d in self._first if d < oldest_kept]:
            del self._first[old]
            self._more.pop(old, None)
        table = self._first[day] = FirstAddresses(slots)
        return table
