"""Long CPU work on an event loop, cut into turns so the loop's other tasks are not held up."""

from __future__ import annotations

import asyncio
import time


class LoopTurns:
    """``take`` hands the event loop to the other ready tasks once ``every`` seconds have passed
    since the last turn, and returns at once before that: a step costs one clock read, and a
    cheap batch is not slowed down by turns it does not need."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._since = time.perf_counter()

    async def take(self) -> None:
        if time.perf_counter() - self._since >= self.every:
            await asyncio.sleep(0)
            self._since = time.perf_counter()
