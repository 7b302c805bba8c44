"""``cancel_and_wait`` stops a task even when a library loses the first cancel (Python 3.11's
``wait_for`` race inside aiokafka), and does not take the caller's own cancel for the task's."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from common import retry
from common.retry import cancel_all_and_wait, cancel_and_wait, finish_despite_cancels


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


async def test_the_callers_own_cancel_goes_on_once_the_task_has_ended() -> None:
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
    assert task.done()


async def test_nested_stops_end_the_inner_task_that_lost_its_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader stopping its follower in a finally, stopped itself by a caller: the caller's
    # repeated cancel reaches the reader while it waits for the follower, which must still end.
    monkeypatch.setattr(retry, "CANCEL_REPEAT_S", 0.05)
    ticks: list[int] = []
    inner = asyncio.create_task(_swallows_first_cancel(ticks))

    async def outer() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await cancel_and_wait(inner)

    task = asyncio.create_task(outer())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 2)
    assert inner.cancelled()


async def test_all_tasks_are_stopped_whatever_one_ended_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "CANCEL_REPEAT_S", 0.05)

    async def fails() -> None:
        raise RuntimeError("topic missing")

    failed = asyncio.create_task(fails())
    others = [asyncio.create_task(_swallows_first_cancel([])) for _ in range(2)]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all_and_wait(failed, *others), 2)
    assert all(t.cancelled() for t in others)
    assert isinstance(failed.exception(), RuntimeError)


async def test_none_is_nothing_to_stop() -> None:
    await cancel_and_wait(None)


async def test_a_step_finished_despite_cancels_ends_even_through_a_repeated_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop's cancel repeats every CANCEL_REPEAT_S: a shield gave up at the second one and
    left the step (a consumer leaving its group) running after the stop returned."""
    monkeypatch.setattr(retry, "CANCEL_REPEAT_S", 0.05)
    ended: list[str] = []

    async def slow_stop() -> None:
        await asyncio.sleep(0.3)
        ended.append("left the group")

    async def owner() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await finish_despite_cancels(slow_stop(), "leaving the group", timeout=5)

    task = asyncio.create_task(owner())
    await asyncio.sleep(0.01)
    await cancel_and_wait(task)
    assert ended == ["left the group"]
    assert task.cancelled()


async def test_a_step_past_its_timeout_is_cancelled_and_one_deaf_to_it_left_behind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(retry, "CANCEL_REPEAT_S", 0.05)
    cancelled: list[str] = []

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append("hangs")
            raise

    released = False

    async def deaf() -> None:
        while not released:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    await finish_despite_cancels(hangs(), "hanging step", timeout=0.1)
    assert cancelled == ["hangs"]
    started = asyncio.get_running_loop().time()
    await finish_despite_cancels(deaf(), "deaf step", timeout=0.1)  # returns: a stop must end
    assert asyncio.get_running_loop().time() - started < 1
    assert "hanging step did not end within 0.1 s; cancelling it" in caplog.text
    assert "deaf step: still running after its cancel" in caplog.text
    released = True  # the test's loop would wait for it at its end


async def test_a_steps_error_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise RuntimeError("stop failed")

    await finish_despite_cancels(fails(), "the step", timeout=1)
    assert "the step failed: RuntimeError: stop failed" in caplog.text
