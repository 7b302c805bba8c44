"""One way to retry: exponential backoff, a log line per failure, never give up silently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


async def keep_running(step: Callable[[], Awaitable[None]], what: str, first_delay: float, max_delay: float) -> None:
    """Run a long-lived ``step`` (a follower, a consumer loop) again after each failure, with
    backoff, until cancelled."""
    while True:
        await retry_forever(step, what, first_delay, max_delay)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has stopped (None: nothing to stop)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def transient_only(exc: Exception) -> bool:
    """Never give up: every failure is taken as transient."""
    return False


async def retry_forever(
    call: Callable[[], Awaitable[T]],
    what: str,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
    permanent: Callable[[Exception], bool] = transient_only,
) -> T:
    """Await ``call()`` until it succeeds. For steps that must not be skipped (the store or the
    broker is down: waiting is right, dropping the work would lose it).

    A failure ``permanent`` says retrying cannot fix (a record too large, a value out of a
    column's range) is raised at once: retrying it would wedge the caller forever."""
    delay = first_delay
    while True:
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if permanent(exc):
                raise
            log.error("%s failed (retry in %.1fs): %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
