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

from common.retry import cancel_and_wait
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
    assert (progress.commit_point(), progress.held) == (None, 3)  # 10 has not ended
    progress.done(10)
    assert progress.commit_point() is None
    progress.done(10)
    assert (progress.commit_point(), progress.held) == (13, 0)
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

    async def send_and_wait(topic: str, value: bytes, key: bytes, headers: Any = None) -> None:
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
    d._hand_over(in_flight, TP, records("ntf_first"))
    await asyncio.sleep(0.05)
    d._hand_over(in_flight, TP, records("ntf_second", first=1))  # the next fetch, same key
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
    assert (d.stats.delivered, d.stats.dead_lettered, len(letters), in_flight.held) == (2, 2, 2, 0)
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
    d._hand_over(in_flight, TP, records("ntf_bug"))
    d._hand_over(in_flight, TP, records("ntf_after", first=1))
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
    d._hand_over(in_flight, TP, records("ntf_a", key=b"a"))
    d._hand_over(in_flight, TP, records("ntf_b", first=1, key=b"b"))
    d._hand_over(in_flight, TP, records("ntf_b2", first=2, key=b"b"))  # queued behind ntf_b
    await asyncio.sleep(0.05)
    assert len(in_flight.running) == 2  # down.test's ntf_b (hanging) and its ntf_b2 behind it
    await in_flight.on_partitions_revoked({TP})
    assert consumer.commits == [{TP: 1}]  # offset 0 ended everywhere; 1 hangs at down.test
    assert not in_flight.running
    assert not in_flight.progress
    assert "down.test:ntf_b2" not in answered  # the queued chain was stopped too, never started
    await d.client.aclose()


async def test_after_a_chain_that_failed_no_later_chain_of_its_slot_delivers() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    d, _ = deliverer(answer)
    calls: list[str] = []

    async def broken(endpoint: Any, n: Any, body: bytes, record: Any) -> None:
        calls.append(n.id)
        if n.id == "ntf_bug":
            raise RuntimeError("a bug")

    d._deliver = broken  # type: ignore[method-assign]
    in_flight = _InFlight(FakeConsumer())
    for offset, nid in enumerate(["ntf_bug", "ntf_second", "ntf_third"]):
        d._hand_over(in_flight, TP, records(nid, first=offset))
    await settle(in_flight)
    assert calls == ["ntf_bug", "ntf_bug"]  # once per endpoint, nothing after it
    with pytest.raises(RuntimeError, match="a bug"):
        in_flight.raise_failure()
    await d.client.aclose()


async def test_a_revoke_whose_commit_fails_still_stops_the_partitions_deliveries() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()  # every endpoint hangs
        return httpx.Response(200)

    class LostSession(FakeConsumer):
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            raise RuntimeError("CommitFailedError: the member's session was lost")

    d, _ = deliverer(answer, notify_webhook_timeout_s=60.0)
    in_flight = _InFlight(LostSession())
    d._hand_over(in_flight, TP, records("ntf_a", "ntf_b"))
    d._hand_over(in_flight, TP, records("ntf_c", first=2, key=b"other"))
    await asyncio.sleep(0)
    in_flight.progress[TP].done(0)  # as if ntf_a had ended everywhere: a commit point to try
    in_flight.progress[TP].done(0)
    await in_flight.on_partitions_revoked({TP})
    assert not in_flight.running
    assert not in_flight.progress
    await d.client.aclose()


async def test_a_record_that_is_no_notification_is_dead_lettered_in_its_turn_before_the_commit() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    d, _ = deliverer(answer)
    broker_takes_it = asyncio.Event()
    letters: list[bytes] = []

    async def send_and_wait(topic: str, value: bytes, key: bytes, headers: Any = None) -> None:
        await broker_takes_it.wait()
        letters.append(value)

    d._producer = SimpleNamespace(send_and_wait=send_and_wait)
    consumer = FakeConsumer()
    in_flight = _InFlight(consumer)
    bad = SimpleNamespace(topic=TP.topic, partition=0, offset=0, key=b"k", value=b"{not json", headers=())
    d._hand_over(in_flight, TP, [bad, *records("ntf_after", first=1)])  # returns at once: no await in it
    await asyncio.sleep(0.05)
    await in_flight.commit()
    assert consumer.commits == []  # the dead letter has not landed
    broker_takes_it.set()
    await settle(in_flight)
    await in_flight.commit()
    assert consumer.commits == [{TP: 2}]
    assert len(letters) == 1
    assert d.stats.invalid == 1
    await d.client.aclose()


class ScriptedConsumer(FakeConsumer):
    """Hands out one fetch of ``batch`` notifications per poll, then nothing."""

    def __init__(self, fetches: list[list[Any]]) -> None:
        super().__init__()
        self.fetches = fetches
        self._paused: set[TopicPartition] = set()
        self.polls_paused = 0
        self.stopped = False

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await asyncio.sleep(0.7)  # leaving the group takes longer than a stop's repeated cancel
        self.stopped = True

    def pause(self, *tps: TopicPartition) -> None:
        self._paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        await asyncio.sleep(0.01)
        if self._paused:
            self.polls_paused += 1
            return {}
        return {TP: self.fetches.pop(0)} if self.fetches else {}


async def test_fetching_pauses_at_the_bound_and_a_stop_ends_every_chain_and_leaves_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.notify.deliver as deliver_module

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.test":
            await asyncio.Event().wait()  # never answers: everything stays held
        return httpx.Response(200)

    d, _ = deliverer(answer, notify_webhook_timeout_s=60.0)
    consumer = ScriptedConsumer([records(*(f"ntf_{i}_{j}" for j in range(5)), first=5 * i) for i in range(10)])
    stopped_producer = asyncio.Event()

    async def start() -> None:
        pass

    async def stop() -> None:
        stopped_producer.set()

    producer = SimpleNamespace(start=start, stop=stop)

    async def no_check(*args: Any) -> None:
        pass

    monkeypatch.setattr(deliver_module, "MAX_HELD_NOTIFICATIONS", 10)
    monkeypatch.setattr(deliver_module, "topic_partitions", no_check)
    monkeypatch.setattr(deliver_module.kafka_clients, "consumer", lambda *a, **k: consumer)
    monkeypatch.setattr(deliver_module.kafka_clients, "producer", lambda *a, **k: producer)
    task = asyncio.create_task(d._consume())
    await asyncio.sleep(0.3)
    assert len(consumer.fetches) == 8  # two fetches (10 held), then paused
    assert consumer.polls_paused > 0  # still polling: the group keeps the member
    running = {t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_InFlight._after"}  # type: ignore[union-attr]
    assert running  # the chains to down.test hang
    await cancel_and_wait(task)
    assert consumer.stopped
    assert stopped_producer.is_set()
    assert not [t for t in running if not t.done()]
    await d.client.aclose()


async def test_a_revokes_commit_waits_for_the_loops_so_commits_never_go_backwards() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    class SlowFirstCommit(FakeConsumer):
        calls = 0

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            self.calls += 1
            if self.calls == 1:
                await asyncio.sleep(0.1)  # aiokafka retries a commit after a backoff
            self.commits.append(dict(offsets))

    d, _ = deliverer(answer)
    consumer = SlowFirstCommit()
    in_flight = _InFlight(consumer)
    d._hand_over(in_flight, TP, records("ntf_a"))
    await settle(in_flight)
    loops = asyncio.create_task(in_flight.commit())  # offset 1, slowly
    await asyncio.sleep(0.01)
    d._hand_over(in_flight, TP, records("ntf_b", first=1))
    await settle(in_flight)
    await in_flight.on_partitions_revoked({TP})  # offset 2
    await loops
    assert consumer.commits == [{TP: 1}, {TP: 2}]
    await d.client.aclose()


async def test_a_record_that_is_no_notification_fetched_again_is_not_dead_lettered_again() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    d, letters = deliverer(answer)
    in_flight = _InFlight(FakeConsumer())
    bad = SimpleNamespace(topic=TP.topic, partition=0, offset=0, key=b"k", value=b"{not json", headers=())
    for _ in range(2):  # fetched again after a revoke
        d._hand_over(in_flight, TP, [bad])
        await settle(in_flight)
        await in_flight.drop({TP})
    assert len(letters) == 1
    assert (d.stats.invalid, d.stats.duplicates) == (1, 1)
    await d.client.aclose()


async def test_a_commit_waiting_behind_a_revoke_does_not_commit_the_revoked_partition() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        nid = request.headers["X-Meter-Notification-Id"]
        if nid == "ntf_b":
            await asyncio.sleep(0.03)  # ends while the revoke's commit is on its way
        if nid == "ntf_c" and request.url.host == "down.test":
            await asyncio.Event().wait()  # the drop has a chain to wait for
        return httpx.Response(200)

    class SlowCommits(FakeConsumer):
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            await asyncio.sleep(0.05)
            self.commits.append(dict(offsets))

    d, _ = deliverer(answer, notify_webhook_timeout_s=60.0)
    consumer = SlowCommits()
    in_flight = _InFlight(consumer)
    d._hand_over(in_flight, TP, records("ntf_a", key=b"a"))
    await asyncio.sleep(0.01)  # ntf_a ended everywhere
    d._hand_over(in_flight, TP, records("ntf_b", first=1, key=b"b"))
    d._hand_over(in_flight, TP, records("ntf_c", first=2, key=b"c"))
    revoke = asyncio.create_task(in_flight.on_partitions_revoked({TP}))  # commits 1
    await asyncio.sleep(0.01)
    await in_flight.commit()  # the loop's, waiting for the lock: by then the partition is gone
    await revoke
    assert consumer.commits == [{TP: 1}]
    await d.client.aclose()
