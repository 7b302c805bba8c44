"""The webhook deliverer's pipeline, without a broker: each endpoint at its own pace across
fetches, each key in order per endpoint, and the commit point (tests/integration/
test_notifications.py runs it on the real broker)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition
from pydantic import SecretStr

from tests.unit.test_notifications import SECRET, _notification
from worker.notify.deliver import WebhookDeliverer, _InFlight
from worker.notify.progress import PartitionProgress
from worker.settings import Settings

TP = TopicPartition("usage.notifications", 0)


def test_the_commit_point_is_the_first_offset_not_ended() -> None:
    progress = PartitionProgress()
    assert progress.commit_point() is None
    progress.add(10, 2)
    progress.add(11, 0)  # nothing to deliver (not a notification): ended at once
    progress.add(12, 2)
    progress.done(12)
    progress.done(12)
    assert (progress.commit_point(), progress.outstanding) == (None, 2)  # 10 has not ended
    progress.done(10)
    assert progress.commit_point() is None
    progress.done(10)
    assert (progress.commit_point(), progress.outstanding) == (13, 0)
    progress.add(13, 1)
    assert progress.commit_point() == 13  # stays until 13 ends
    with pytest.raises(ValueError, match="after 13"):
        progress.add(13, 1)  # offsets are handed over in order, once
    progress.done(13)
    with pytest.raises(ValueError, match="more deliveries ended"):
        progress.done(13)  # more endings than deliveries handed over


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


def records(*ids: str, first: int = 0, key: bytes = b"k") -> list[Any]:
    return [
        SimpleNamespace(
            topic=TP.topic,
            partition=TP.partition,
            offset=first + i,
            key=key,
            value=json.dumps(_notification(id=nid)).encode(),
        )
        for i, nid in enumerate(ids)
    ]


def deliverer(answer: Callable[[httpx.Request], httpx.Response], **more: Any) -> tuple[WebhookDeliverer, list[bytes]]:
    settings = Settings(
        notify_webhook_urls=("http://down.test/hook", "http://up.test/hook"),
        notify_webhook_secret=SecretStr(SECRET),
        **{"notify_max_attempts": 3, **more},
    )

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(0.001)

    d = WebhookDeliverer(settings, sleep=sleep, jitter=lambda: 0.5, transport=httpx.MockTransport(answer))
    letters: list[bytes] = []

    async def send_and_wait(topic: str, value: bytes, key: bytes) -> None:
        letters.append(value)

    d._producer = SimpleNamespace(send_and_wait=send_and_wait)
    return d, letters


async def settle(in_flight: _InFlight) -> None:
    while in_flight.running:
        await asyncio.wait(set(in_flight.running))


async def test_a_failing_endpoint_holds_back_neither_the_fetch_nor_the_next_one() -> None:
    """Each fetch waited for every endpoint's retries: the healthy endpoint got a key's next
    notification only once the failing one had used all its attempts on the one before."""
    seen: list[str] = []
    down_may_answer = asyncio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.headers['X-Meter-Notification-Id']}")
        if request.url.host == "down.test":
            await down_may_answer.wait()
            return httpx.Response(503)
        return httpx.Response(200)

    d, letters = deliverer(answer)  # type: ignore[arg-type]
    consumer = FakeConsumer()
    in_flight = _InFlight(consumer)
    await d._hand_over(in_flight, TP, records("ntf_first"))
    await asyncio.sleep(0.05)
    await d._hand_over(in_flight, TP, records("ntf_second", first=1))  # the next fetch, same key
    await asyncio.sleep(0.05)
    assert "up.test:ntf_second" in seen  # while down.test still has its first attempt on ntf_first
    assert seen.count("down.test:ntf_first") == 1
    assert "down.test:ntf_second" not in seen
    await in_flight.commit()
    assert consumer.commits == []  # offset 0 has not ended for down.test
    down_may_answer.set()
    await settle(in_flight)
    # down.test: every attempt at the first before any at the second (the key's order)
    downs = [x for x in seen if x.startswith("down.test")]
    assert downs == ["down.test:ntf_first"] * 3 + ["down.test:ntf_second"] * 3
    await in_flight.commit()
    assert consumer.commits == [{TP: 2}]
    assert (d.stats.delivered, d.stats.dead_lettered, len(letters), in_flight.outstanding) == (2, 2, 2, 0)
    await d.client.aclose()


async def test_a_chain_that_fails_stops_its_key_and_the_failure_is_raised() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    d, _ = deliverer(answer)
    calls: list[str] = []

    async def broken(endpoint: Any, n: Any, body: bytes, record: Any) -> None:
        calls.append(f"{endpoint.url}:{n.id}")
        if n.id == "ntf_bug":
            raise RuntimeError("a bug")

    d._deliver = broken  # type: ignore[method-assign]
    in_flight = _InFlight(FakeConsumer())
    await d._hand_over(in_flight, TP, records("ntf_bug"))
    await d._hand_over(in_flight, TP, records("ntf_after", first=1))
    await settle(in_flight)
    assert not [c for c in calls if c.endswith("ntf_after")]  # not delivered past the one that failed
    with pytest.raises(RuntimeError, match="a bug"):
        in_flight.raise_failure()
    await in_flight.commit()
    assert in_flight.consumer.commits == []
    await d.client.aclose()


async def test_a_revoked_partition_commits_what_ended_and_stops_every_chain() -> None:
    answered: list[str] = []
    never = asyncio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        nid = request.headers["X-Meter-Notification-Id"]
        answered.append(f"{request.url.host}:{nid}")
        if request.url.host == "down.test" and nid != "ntf_a":
            await never.wait()  # hangs until cancelled
        return httpx.Response(200)

    d, _ = deliverer(answer, notify_webhook_timeout_s=60.0)
    consumer = FakeConsumer()
    in_flight = _InFlight(consumer)
    await d._hand_over(in_flight, TP, records("ntf_a", key=b"a"))
    await d._hand_over(in_flight, TP, records("ntf_b", first=1, key=b"b"))
    await d._hand_over(in_flight, TP, records("ntf_b2", first=2, key=b"b"))  # queued behind ntf_b
    await asyncio.sleep(0.05)
    assert len(in_flight.running) == 2  # down.test's ntf_b (hanging) and its ntf_b2 behind it
    await in_flight.on_partitions_revoked({TP})
    assert consumer.commits == [{TP: 1}]  # offset 0 ended everywhere; 1 hangs at down.test
    assert not in_flight.running
    assert not in_flight.progress
    assert "down.test:ntf_b2" not in answered  # the queued chain was stopped too, never started
    await d.client.aclose()
