"""A stopping worker gives the last audit writes and notifications a bounded time: past it, one
warning says what is left, and the stop goes on."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from worker.limits import service


async def test_work_that_outlasts_the_stop_time_is_left_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(service, "NOTIFICATIONS_FLUSH_TIMEOUT", 0.05)
    left = ["3 decisions"]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=service.log.name):
        await service._finish_within(asyncio.sleep(10), lambda: f"{left[0]} not recorded")
    assert time.monotonic() - started < 5
    assert [r.getMessage() for r in caplog.records] == ["3 decisions not recorded"]


async def test_work_that_ends_in_time_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    done = []

    async def work() -> None:
        done.append(True)

    with caplog.at_level(logging.WARNING, logger=service.log.name):
        await service._finish_within(work(), lambda: "left")
    assert done == [True]
    assert caplog.records == []
