from __future__ import annotations

import asyncio

from common.loop_turns import LoopTurns


async def turns_taken_by_others(turns: LoopTurns, takes: int) -> int:
    """How often another ready task ran while ``take`` was called ``takes`` times."""
    ran = 0
    stop = False

    async def other() -> None:
        nonlocal ran
        while not stop:
            ran += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    before = ran
    for _ in range(takes):
        await turns.take()
    stop = True
    after = ran
    await task
    return after - before


def test_a_turn_is_taken_once_its_time_has_come() -> None:
    assert asyncio.run(turns_taken_by_others(LoopTurns(0.0), 5)) == 5


def test_no_turn_is_taken_before_its_time() -> None:
    assert asyncio.run(turns_taken_by_others(LoopTurns(3600.0), 5)) == 0
