"""``cancel_and_wait`` stops a task even when a library loses the first cancel (Python 3.11's
``wait_for`` race inside aiokafka), and does not take the caller's own cancel for the task's."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from common import retry
from common.retry import cancel_and_wait


async def _swallows_first_cancel(ticks: list[int]) -> None:
    # What the race in wait_for does: the cancel is gone, the coroutine goes on.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(10)
    while True:
        ticks.append(1)
        await asyncio.sleep(0.01)


async def test_a_task_that_lost_the_first_cancel_is_cancelled_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "CANCEL_REPEAT_S", 0.05)
    ticks: list[int] = []
    task = asyncio.create_task(_swallows_first_cancel(ticks))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 2)
    assert task.cancelled()
    assert ticks, "the task went on after the first cancel, as the race does"


async def test_a_task_that_failed_raises_its_error() -> None:
    async def fails() -> None:
        raise RuntimeError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken"):
        await cancel_and_wait(task)


async def test_the_callers_own_cancel_is_not_swallowed() -> None:
    async def stops_slowly() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.shield(asyncio.sleep(0.2))

    task = asyncio.create_task(stops_slowly())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await asyncio.wait({task}, timeout=1)
    assert task.done()


async def test_none_is_nothing_to_stop() -> None:
    await cancel_and_wait(None)
