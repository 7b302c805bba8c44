"""Waiting for the group coordinator at the worker's start (``worker.kafka_ready``)."""

from __future__ import annotations

import logging

import pytest
from aiokafka.errors import CoordinatorNotAvailableError, GroupAuthorizationFailedError

from worker.kafka_ready import COORDINATOR_RETRY_S, coordinator_named


class _Admin:
    """Answers ``find_coordinator`` with the given outcomes in turn (an exception is raised)."""

    def __init__(self, *outcomes: int | Exception) -> None:
        self.outcomes = list(outcomes)
        self.asked = 0

    async def find_coordinator(self, group_id: str) -> int:
        self.asked += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_a_new_cluster_is_waited_for_quietly_until_it_names_the_coordinator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    admin = _Admin(CoordinatorNotAvailableError(), CoordinatorNotAvailableError(), 1)
    with caplog.at_level(logging.INFO, "worker.kafka_ready"):
        assert await coordinator_named(admin, "usage-meter", 30, clock=clock, sleep=clock.sleep)
    assert admin.asked == 3
    assert clock.now == pytest.approx(2 * COORDINATOR_RETRY_S)
    # Said once what it waits for and once that it is ready: no error, no line per retry.
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    assert "offsets topic" in caplog.records[0].getMessage()


async def test_past_the_timeout_the_worker_starts_anyway_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    admin = _Admin(*[CoordinatorNotAvailableError()] * 100)
    with caplog.at_level(logging.INFO, "worker.kafka_ready"):
        assert not await coordinator_named(admin, "usage-meter", 1.0, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(1.0)
    assert caplog.records[-1].levelno == logging.WARNING


async def test_any_other_answer_is_left_to_the_consumer_at_once() -> None:
    clock = _Clock()
    admin = _Admin(GroupAuthorizationFailedError())
    assert not await coordinator_named(admin, "usage-meter", 30, clock=clock, sleep=clock.sleep)
    assert (admin.asked, clock.now) == (1, 0.0)


async def test_a_ready_cluster_is_asked_once_and_nothing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    admin = _Admin(1)
    with caplog.at_level(logging.DEBUG, "worker.kafka_ready"):
        assert await coordinator_named(admin, "usage-meter", 30)
    assert (admin.asked, caplog.records) == (1, [])
