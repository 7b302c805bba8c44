"""Rows waiting for their audit insert (the decisions read, the notifications that landed).

One insert at a time, retried until the store takes it. A batch goes back for the next insert
only when its insert failed: a caller cancelled (a stop, a revoke's time running out) while the
insert's thread runs does not stop the thread, and the batch, put back then, was recorded twice
when that thread landed. The audit tables collapse copies on merge, but a copy is an extra part
and extra rows until then.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from common.retry import retry_forever

T = TypeVar("T")


class AuditBuffer(Generic[T]):
    """``add`` rows; ``record`` inserts what was added, in one insert."""

    def __init__(self, insert: Callable[[list[T]], Any], what: str) -> None:
        self._insert = insert  # blocking (the store's client): run in a thread
        self.what = what
        self._items: list[T] = []
        self._lock = asyncio.Lock()
        self._left: asyncio.Future[Any] | None = None  # an insert whose caller was cancelled
        self._in_insert = 0  # rows of the insert under way (left running or not)

    def __len__(self) -> int:
        """Rows not recorded yet (an insert under way included)."""
        return len(self._items) + self._in_insert

    def add(self, rows: Iterable[T]) -> None:
        self._items += rows

    async def record(self) -> None:
        """Insert the rows added so far; retried until the store is back. An insert left
        running by a cancelled call is waited for first (its rows are back if it failed)."""
        async with self._lock:
            if self._left is not None:
                await asyncio.wait({self._left})
                self._left = None
                self._in_insert = 0
            batch, self._items = self._items, []
            if not batch:
                return
            self._in_insert = len(batch)
            running: asyncio.Future[Any] | None = None

            async def attempt() -> None:
                nonlocal running
                running = asyncio.ensure_future(asyncio.to_thread(self._insert, batch))
                await asyncio.shield(running)
                running = None

            try:
                await retry_forever(attempt, f"recording {len(batch)} {self.what}")
            except BaseException:
                if running is not None and not running.done():
                    self._left = running  # its rows stay counted until it ends
                    running.add_done_callback(functools.partial(self._after_left, batch))
                else:
                    self._in_insert = 0
                    if running is None or _failed(running):
                        self._items[:0] = batch  # no insert of it under way: kept for the next one
                raise
            self._in_insert = 0

    def _after_left(self, batch: list[T], insert: asyncio.Future[Any]) -> None:
        self._in_insert = 0
        if _failed(insert):
            self._items[:0] = batch  # it did not land: the next insert takes it


def _failed(insert: asyncio.Future[Any]) -> bool:
    return insert.cancelled() or insert.exception() is not None
