"""The one way to retry: exponential backoff, every failure reported, and a give-up condition.

Every backoff loop of the node and the worker goes through ``retry_forever`` (the store calls
of a batch, the followers of the control topics, the node's reporter and decision cache), so
the delays, the logging and the way out are the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# (the failure, the attempt that failed (1 = first), the delay before the next attempt)
OnFailure = Callable[[Exception, int, float], None]
Sleep = Callable[[float], Awaitable[Any]]


def transient_only(exc: Exception) -> bool:
    """Never give up: every failure is taken as transient."""
    return False


def describe_error(exc: BaseException) -> str:
    """``Type: message`` once (aiokafka's errors already start with their type name)."""
    name, text = type(exc).__name__, str(exc)
    return text if text.startswith(name) else f"{name}: {text}" if text else name


async def retry_forever(
    call: Callable[[], Awaitable[T]],
    what: str,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
    permanent: Callable[[Exception], bool] = transient_only,
    *,
    on_failure: OnFailure | None = None,
    on_recovery: Callable[[int], None] | None = None,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Await ``call()`` until it succeeds, doubling the delay after each failure up to ``max_delay``.

    For steps that must not be skipped (the store or the broker is down: waiting is right,
    dropping the work would lose it). ``permanent`` is the give-up condition: a failure it
    says retrying cannot fix (a record too large, a value out of a column's range) or must not
    retry any more (the batch's partitions moved to another worker, the caller is stopping) is
    raised at once; retrying it would wedge the caller forever.

    Each other failure is logged (``what`` failed, the attempt, the delay), or handed to
    ``on_failure`` instead when the caller reports failures its own way. ``sleep`` waits out
    the delay (a caller that must wake early on shutdown passes its own). A success after
    failures is logged, or handed to ``on_recovery`` (the attempts it took) instead.
    """
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if permanent(exc):
                raise
            if on_failure is not None:
                on_failure(exc, attempt, delay)
            else:
                log.error("%s failed (attempt %d, retry in %.1fs): %s", what, attempt, delay, describe_error(exc))
            await sleep(delay)
            delay = min(delay * 2, max_delay)
        else:
            if attempt > 1 and on_recovery is not None:
                on_recovery(attempt)
            elif attempt > 1:
                log.warning("%s succeeded after %d attempts", what, attempt)
            return result


async def keep_running(step: Callable[[], Awaitable[None]], what: str, first_delay: float, max_delay: float) -> None:
    """Run a long-lived ``step`` (a follower, a consumer loop) again after each failure, with
    backoff, until cancelled."""
    while True:
        await retry_forever(step, what, first_delay, max_delay)


# How long a cancelled task may run on before it is cancelled again.
CANCEL_REPEAT_S = 0.5


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has stopped (None: nothing to stop); a task
    that failed raises its error here.

    The cancel is repeated until the task ends: one can be lost inside a library. Python 3.11's
    ``asyncio.wait_for`` drops a cancel that arrives as its awaitable completes (fixed in 3.12),
    and aiokafka's requests go through it. A follower cancelled while it asked for a topic's
    partitions lost the cancel and then followed the topic for ever: ``meter why`` with a
    missing topic hung in CI, and 6 to 8 of 60 reads cancelled 0-30 ms after their start never
    stopped. A cancel of the caller itself is not taken for the task's: the task is ended, then
    the caller's cancel goes on."""
    if task is None:
        return
    caller_cancelled = False
    while not task.done():
        task.cancel()
        # The caller may be stopped too (nested stops): the task is still ended first.
        caller_cancelled |= await _cancelled_while_waiting(task, CANCEL_REPEAT_S)
    if caller_cancelled:
        raise asyncio.CancelledError
    if not task.cancelled():
        task.result()


async def finish_despite_cancels(step: Coroutine[Any, Any, None], what: str, timeout: float) -> None:
    """Run ``step`` to its end even if the caller is cancelled meanwhile (a stop's cancel is
    repeated: ``cancel_and_wait``), then let the caller's cancel go on. Bounded: past
    ``timeout`` the step is cancelled, and one that still runs ``CANCEL_REPEAT_S`` later is
    left to end on its own (a stop must end). Its error is logged, never raised."""
    task = asyncio.create_task(step)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    caller_cancelled = cancelled = False
    while not task.done():
        left = deadline - loop.time()
        if left <= 0 and cancelled:
            log.warning("%s: still running after its cancel; left to end on its own", what)
            break
        if left <= 0:
            log.warning("%s did not end within %g s; cancelling it", what, timeout)
            task.cancel()
            cancelled, deadline = True, loop.time() + CANCEL_REPEAT_S
            continue
        caller_cancelled |= await _cancelled_while_waiting(task, left)
    error = task.exception() if task.done() and not task.cancelled() else None
    if error is not None:
        log.warning("%s failed: %s", what, describe_error(error))
    if caller_cancelled:
        raise asyncio.CancelledError


async def _cancelled_while_waiting(task: asyncio.Task[Any], timeout: float) -> bool:
    """Wait up to ``timeout`` for ``task``; True if the caller was cancelled meanwhile (the wait
    ends there: the caller re-raises its cancel once it is done with the task)."""
    try:
        await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        return True
    return False


async def cancel_all_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """``cancel_and_wait`` for several tasks at once, each stopped whatever the others do: an
    error a task ended with is not raised here (the caller took what it needed from the tasks
    that ended before; one stopped in order would leave the rest to a single cancel)."""
    outcomes = await asyncio.gather(*(cancel_and_wait(t) for t in tasks), return_exceptions=True)
    for task, outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            log.debug("stopped %s: it had ended with %s", task.get_name(), describe_error(outcome))
