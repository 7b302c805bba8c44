"""The worker's publisher of decisions and allowances: per key in order, keys independent,
waiting allowances superseded, failures logged once per interval, a stop bounded."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiokafka.errors import NotEnoughReplicasError

from worker.limits.publisher import KeyedPublisher

DECISIONS, ALLOWANCES = "decisions", "allowances"


class Broker:
    """Records what landed; refuses the keys in ``refusing`` (a partition below min ISR)."""

    def __init__(self) -> None:
        self.landed: list[tuple[str, str, bytes]] = []
        self.refusing: set[str] = set()
        self.attempts = 0

    async def send(self, topic: str, key: str, value: bytes) -> None:
        self.attempts += 1
        await asyncio.sleep(0)
        if key in self.refusing:
            raise NotEnoughReplicasError()
        self.landed.append((topic, key, value))


async def test_a_newer_allowance_replaces_one_still_waiting_and_decisions_are_all_sent() -> None:
    broker = Broker()
    broker.refusing.add("k")
    publisher = KeyedPublisher(broker.send, latest_only={ALLOWANCES})
    publisher.submit([(ALLOWANCES, "k", b"a1")])  # being sent, refused
    await asyncio.sleep(0.01)
    publisher.submit([(DECISIONS, "k", b"d1"), (ALLOWANCES, "k", b"a2")])
    publisher.submit([(ALLOWANCES, "k", b"a3"), (DECISIONS, "k", b"d2")])
    assert publisher.superseded == 1  # a2: waiting when a3 came
    broker.refusing.clear()
    await asyncio.wait_for(publisher.flush(), 5)
    # a1 was in flight: it lands first (a newer one must not be overtaken by it later)
    assert [v for _, _, v in broker.landed] == [b"a1", b"d1", b"a3", b"d2"]
    assert publisher.published == {ALLOWANCES: 2, DECISIONS: 2}
    assert publisher.waiting() == (0, 0)


async def test_failures_are_logged_once_per_interval_with_what_waits(caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    broker.refusing.update(f"k{i}" for i in range(50))
    publisher = KeyedPublisher(broker.send, log_interval_s=60)
    publisher.submit([(DECISIONS, f"k{i}", b"d") for i in range(50)])
    with caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        await asyncio.sleep(0.5)  # 50 keys, each refused about three times (0.2 s, then 0.4 s backoff)
        assert broker.attempts >= 100
        broker.refusing.clear()
        await asyncio.wait_for(publisher.flush(), 5)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    recoveries = [r for r in caplog.records if "landed" in r.getMessage()]
    assert len(failures) == 1
    assert len(recoveries) == 1
    assert "50 keys waiting" in failures[0].getMessage()
    assert len(broker.landed) == 50


async def test_a_stop_gives_up_within_its_bound_and_says_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    broker.refusing.add("stuck")
    publisher = KeyedPublisher(broker.send)
    publisher.submit([(DECISIONS, "stuck", b"d1"), (DECISIONS, "stuck", b"d2"), (DECISIONS, "ok", b"d")])
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        await publisher.close(0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert broker.landed == [(DECISIONS, "ok", b"d")]
    assert "2 decision/allowance records of 1 keys not published" in caplog.text
    attempts = broker.attempts
    await asyncio.sleep(0.5)
    assert broker.attempts == attempts  # nothing retries after the stop
