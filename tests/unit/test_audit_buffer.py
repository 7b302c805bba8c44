"""The audit buffer: rows recorded once each, whatever cancels the caller of an insert."""

from __future__ import annotations

import asyncio
import threading
import time

from worker.limits.audit_buffer import AuditBuffer


class Store:
    """A blocking insert that takes ``delay_s`` and fails while ``failing``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.rows: list[str] = []
        self.delay_s = delay_s
        self.failing = False
        self.started = threading.Event()

    def insert(self, batch: list[str]) -> None:
        self.started.set()
        time.sleep(self.delay_s)
        if self.failing:
            raise ConnectionError("store away")
        self.rows += batch


async def cancel_once_started(store: Store, buffer: AuditBuffer[str]) -> None:
    call = asyncio.create_task(buffer.record())
    while not store.started.is_set():
        await asyncio.sleep(0.005)
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)


async def test_an_insert_that_lands_after_its_caller_was_cancelled_is_not_recorded_again() -> None:
    store = Store(delay_s=0.2)
    buffer: AuditBuffer[str] = AuditBuffer(store.insert, "rows")
    buffer.add(["a", "b"])
    await cancel_once_started(store, buffer)
    assert len(buffer) == 2  # not recorded yet: still counted (found by a review)
    buffer.add(["c"])
    await buffer.record()  # waits for the insert left running, then inserts the rest
    assert store.rows == ["a", "b", "c"]
    assert len(buffer) == 0


async def test_an_insert_that_fails_after_its_caller_was_cancelled_gives_its_rows_back() -> None:
    store = Store(delay_s=0.2)
    store.failing = True
    buffer: AuditBuffer[str] = AuditBuffer(store.insert, "rows")
    buffer.add(["a"])
    await cancel_once_started(store, buffer)
    await asyncio.sleep(0.3)  # it failed meanwhile
    assert len(buffer) == 1
    store.failing = False
    await buffer.record()
    assert store.rows == ["a"]


async def test_a_call_cancelled_between_retries_gives_its_rows_back() -> None:
    store = Store()
    store.failing = True
    buffer: AuditBuffer[str] = AuditBuffer(store.insert, "rows")
    buffer.add(["a"])
    call = asyncio.create_task(buffer.record())
    await asyncio.sleep(0.1)  # failed once, waiting to retry
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    assert len(buffer) == 1
    store.failing = False
    await buffer.record()
    assert store.rows == ["a"]
