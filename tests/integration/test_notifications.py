"""Threshold notifications on the real broker and chDB: each threshold fires once per key and
window through a worker restart and partition moves; the webhook deliverer against a real
HTTP receiver on loopback that fails, times out and recovers; what never gets through is
dead-lettered; offsets are committed only once a notification is delivered or dead-lettered."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from common import kafka_clients
from schemas.decisions import Window, window_start
from schemas.events import RequestEvent, make_event
from schemas.notifications import Notification, UndeliveredNotification, notification_id
from tests.integration.helpers import free_port, group_caught_up, read_topic, wait_for
from worker.app import WorkerRuntime
from worker.notify.deliver import WebhookDeliverer
from worker.settings import Settings
from worker.simulate import publish
from worker.store.notifications import NotificationStore
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

SECRET = "webhook-secret-for-tests-0123456789abcdef"


@pytest.fixture
def settings(make_settings: Callable[..., Settings], unique: str) -> Settings:
    """This module's settings: its own notifications topics and deliverer group."""
    return make_settings(
        notifications_topic=f"t{unique}.notifications",
        notifications_dlq_topic=f"t{unique}.notifications.dlq",
        notify_consumer_group=f"n{unique}",
        batch_timeout_ms=20,
    )


@pytest.fixture
async def notify_topics(topics: Settings) -> AsyncIterator[Settings]:
    """The test's topics, the notifications topics among them (deleted afterwards)."""
    yield topics
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topics.notifications_topic, topics.notifications_dlq_topic])
    except Exception:  # best-effort cleanup
        pass
    finally:
        await admin.close()


class Clock:
    """Real time plus an offset the test moves (the worker's and the events' 'now')."""

    def __init__(self) -> None:
        # Just past the start of a minute: the whole test fits in one minute window.
        self.offset = (time.time() // 60 + 1) * 60 + 1 - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset


def events(key_id: str, n: int, clock: Clock) -> list[RequestEvent]:
    return [
        make_event(
            request_id=uuid.uuid4().hex,
            key_id=key_id,
            account_id="acct-n",
            node_id="node-1",
            method="GET",
            endpoint="/v0/rates",
            status=200,
            ts=datetime.fromtimestamp(clock(), UTC),
        )
        for _ in range(n)
    ]


async def notifications_of(settings: Settings, at_least: int) -> list[Notification]:
    records = await read_topic(settings, settings.notifications_topic, at_least=at_least, timeout=30)
    return [Notification.model_validate_json(r.value) for r in records]


async def test_each_threshold_fires_once_per_window_through_a_restart_and_partition_moves(
    notify_topics: Settings, clickhouse: Any
) -> None:
    settings = notify_topics.model_copy(update={"notify_thresholds_per_minute": (50,)})  # beside 80% and 100%
    store = RollupStore(clickhouse, settings.clickhouse_database)
    clock = Clock()
    key = "cf_liv_notify_threshold_key"
    minute = window_start(Window.minute, clock())

    first = WorkerRuntime(settings, store=store, clock=clock)
    async with first.running():
        await publish(settings, settings.events_topic, events(key, 60, clock))
        assert [n.threshold for n in await notifications_of(settings, 1)] == ["50"]
        await wait_for(lambda: first.consumer is not None and first.consumer.stats.counted >= 60, 20, "60 written")

    # A restart: a new worker knows the counts and what was notified from ClickHouse only.
    second = WorkerRuntime(settings, store=store, clock=clock)
    async with second.running():
        await wait_for(lambda: second.consumer is not None and bool(second.consumer.owned), 20, "assignment")
        await publish(settings, settings.events_topic, events(key, 25, clock))
        assert [n.threshold for n in await notifications_of(settings, 2)] == ["50", "80%"]

        # A third member: every partition is revoked and reassigned (the key's may move).
        third = WorkerRuntime(settings, store=store, clock=clock)
        async with third.running():
            members = (second, third)
            await wait_for(lambda: all(w.consumer is not None and w.consumer.owned for w in members), 30, "a split")
            await publish(settings, settings.events_topic, events(key, 20, clock))
            assert [n.threshold for n in await notifications_of(settings, 3)] == ["50", "80%", "100%"]
        # The third left: the second rebuilds every partition again; nothing is notified again.
        await publish(settings, settings.events_topic, events(key, 5, clock))
        await wait_for(
            lambda: group_caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic),
            30,
            "every event written",
        )
        await asyncio.sleep(1.0)  # room for a notification that should not come
        in_window = await notifications_of(settings, 3)
        assert [n.threshold for n in in_window] == ["50", "80%", "100%"]

        # The next minute: its own crossings, with their own ids.
        clock.offset += 60
        await publish(settings, settings.events_topic, events(key, 85, clock))
        found = await notifications_of(settings, 5)

    assert [(n.window_start.timestamp(), n.threshold) for n in found] == [
        (minute, "50"),
        (minute, "80%"),
        (minute, "100%"),
        (minute + 60, "50"),
        (minute + 60, "80%"),
    ]
    assert [n.count >= n.threshold_count for n in found] == [True] * 5
    assert found[0].limit == 100
    assert found[2].threshold_count == 100
    assert [n.id for n in found] == [
        notification_id(key, Window.minute, int(n.window_start.timestamp()), n.threshold) for n in found
    ]
    assert [n.version for n in found] == sorted(n.version for n in found)
    # Every notification is audited once (the table collapses a second copy of a crossing).
    audited = NotificationStore(clickhouse, settings.clickhouse_database).history(key)
    assert sorted(n.id for n in audited) == sorted(n.id for n in found)


# -- the webhook deliverer against a real receiver --------------------------------------


@dataclass
class Call:
    body: bytes
    headers: dict[str, str]
    verified: bool
    answer: str  # the status sent, or "hang"


class Receiver:
    """A webhook endpoint on loopback, in its own threads: answers each request as its script
    says ("500", "503", "hang" = no answer in time, "200"), then ``then``; it verifies every
    signature itself (HMAC-SHA-256 of ``t.body``, ``t`` within 5 minutes), as a receiver would."""

    def __init__(self, script: list[str], then: str = "200", hang_s: float = 1.5) -> None:
        self.script = list(script)
        self.then = then
        self.hang_s = hang_s
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    answer = receiver.script.pop(0) if receiver.script else receiver.then
                    receiver.calls.append(Call(body, dict(self.headers), receiver.verify(body, self.headers), answer))
                if answer == "hang":
                    time.sleep(receiver.hang_s)
                    answer = "200"  # too late: the deliverer gave up on this attempt
                with contextlib.suppress(OSError):
                    self.send_response(int(answer))
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/meter?token=t0"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def verify(body: bytes, headers: Any) -> bool:
        fields = dict(part.split("=", 1) for part in headers.get("X-Meter-Signature", "").split(",") if "=" in part)
        t, v1 = fields.get("t", ""), fields.get("v1", "")
        if not t.isdigit() or abs(time.time() - int(t)) > 300:
            return False
        expected = hmac.new(SECRET.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, v1)

    def answered(self, status: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.answer == status]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def receivers(*scripts: tuple[list[str], str]) -> Iterator[list[Receiver]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Receiver(script, then)) for script, then in scripts]


def notification(key_id: str, n: int = 0) -> Notification:
    start = int(time.time()) // 60 * 60
    return Notification(
        id=notification_id(key_id, Window.minute, start, "80%"),
        key_id=key_id,
        window=Window.minute,
        window_start=datetime.fromtimestamp(start, UTC),
        window_end=datetime.fromtimestamp(start + 60, UTC),
        threshold="80%",
        threshold_percent=80.0,
        threshold_count=80,
        limit=100,
        count=80 + n,
        version=int(time.time() * 1_000_000) + n,
        decided_at=datetime.now(UTC),
    )


async def publish_notifications(settings: Settings, notes: list[Notification]) -> None:
    producer = kafka_clients.producer(settings, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for n in notes:
            await producer.send_and_wait(
                settings.notifications_topic, n.model_dump_json().encode(), key=n.key_id.encode()
            )
    finally:
        await producer.stop()


def deliverer_settings(base: Settings, urls: list[str], **more: Any) -> Settings:
    values: dict[str, Any] = {
        "notify_webhook_urls": tuple(urls),
        "notify_webhook_secret": SecretStr(SECRET),
        "notify_webhook_timeout_s": 0.5,
        "notify_max_attempts": 5,
        "notify_retry_first_delay_s": 0.05,
        "notify_retry_max_delay_s": 0.2,
        "notify_concurrency_per_endpoint": 2,
        **more,
    }
    return base.model_copy(update=values)


@contextlib.asynccontextmanager
async def delivering(settings: Settings) -> AsyncIterator[WebhookDeliverer]:
    deliverer = WebhookDeliverer(settings)
    await deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.stop()


async def committed(settings: Settings) -> bool:
    return await group_caught_up(settings.kafka_bootstrap, settings.notify_consumer_group, settings.notifications_topic)


async def test_a_receiver_that_fails_then_times_out_then_recovers_gets_the_notification_once_signed(
    notify_topics: Settings,
) -> None:
    with receivers((["500", "hang"], "200")) as [receiver]:
        settings = deliverer_settings(notify_topics, [receiver.url])
        sent = notification("cf_liv_webhook_one")
        await publish_notifications(settings, [sent])
        async with delivering(settings) as deliverer:
            await wait_for(lambda: bool(receiver.answered("200")), 30, "the delivery once the receiver recovers")
            await wait_for(lambda: committed(settings), 20, "the offset committed after the delivery")
            stats = deliverer.stats
        # Failed (500), timed out (no answer within 0.5 s), then accepted: three signed attempts.
        assert [c.answer for c in receiver.calls] == ["500", "hang", "200"]
        assert all(c.verified for c in receiver.calls)
        assert [c.headers["X-Meter-Delivery-Attempt"] for c in receiver.calls] == ["1", "2", "3"]
        assert {c.headers["X-Meter-Notification-Id"] for c in receiver.calls} == {sent.id}
        assert Notification.model_validate_json(receiver.calls[-1].body) == sent
        assert (stats.delivered, stats.retries, stats.dead_lettered) == (1, 2, 0)

        # Another member of the group starts from the committed offset: nothing is sent again.
        async with delivering(settings):
            await asyncio.sleep(2.0)
        assert len(receiver.calls) == 3
    assert await read_topic(settings, settings.notifications_dlq_topic) == []


async def test_an_endpoint_that_never_recovers_gets_a_dead_letter_the_others_their_notification(
    notify_topics: Settings,
) -> None:
    with receivers(([], "503"), ([], "200")) as [down, up]:
        nowhere = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: connection refused
        settings = deliverer_settings(notify_topics, [down.url, up.url, nowhere], notify_max_attempts=3)
        sent = [notification("cf_liv_webhook_a"), notification("cf_liv_webhook_b", 1)]
        await publish_notifications(settings, sent)
        async with delivering(settings) as deliverer:
            letters_raw = await read_topic(settings, settings.notifications_dlq_topic, at_least=4, timeout=30)
            await wait_for(lambda: committed(settings), 20, "the offsets committed after dead-lettering")
            stats = deliverer.stats
        assert sorted(json.loads(c.body)["id"] for c in up.calls) == sorted(n.id for n in sent)  # once each
        assert len(down.calls) == 6  # 3 attempts per notification, then given up
        assert all(c.verified for c in down.calls + up.calls)
    letters = [UndeliveredNotification.model_validate_json(r.value) for r in letters_raw]
    by_endpoint: dict[str, list[UndeliveredNotification]] = {}
    for letter in letters:
        by_endpoint.setdefault(letter.endpoint, []).append(letter)
    assert len(by_endpoint) == 2  # the 503 receiver and the address where nothing listens
    for group in by_endpoint.values():
        assert sorted(x.notification.id for x in group) == sorted(n.id for n in sent)
        assert all(x.attempts == 3 for x in group)
        assert all(x.topic == settings.notifications_topic for x in group)
    reasons = {x.reason for x in letters}
    assert "HTTP 503" in reasons
    assert any("Connect" in r for r in reasons)
    assert all("token" not in x.endpoint for x in letters)  # no query string, no path
    assert [r.key for r in letters_raw] == [x.notification.id.encode() for x in letters]
    assert (stats.delivered, stats.dead_lettered) == (2, 4)


async def test_a_failing_endpoint_does_not_hold_back_the_next_fetch_for_the_others(notify_topics: Settings) -> None:
    # Each fetch waited for every endpoint: one that kept failing (up to 8 attempts, 60 s apart)
    # held every later notification back from all the others.
    with receivers(([], "500"), ([], "200")) as [down, up]:
        settings = deliverer_settings(notify_topics, [down.url, up.url], notify_max_attempts=100)
        first = notification("cf_liv_webhook_pace")
        start = int(first.window_start.timestamp())
        second = first.model_copy(  # the key's next crossing in the same minute
            update={"id": notification_id(first.key_id, Window.minute, start, "90%"), "threshold": "90%", "count": 90}
        )
        await publish_notifications(settings, [first])
        async with delivering(settings):
            await wait_for(lambda: len(up.calls) == 1 and len(down.calls) >= 2, 20, "the first, and retries")
            await publish_notifications(settings, [second])  # a later fetch, the same key
            await wait_for(lambda: len(up.calls) == 2, 10, "the second at the healthy endpoint")
            assert {json.loads(c.body)["id"] for c in down.calls} == {first.id}  # still retrying the first
            assert not await committed(settings)  # the first has not ended at every endpoint
            down.then = "200"
            await wait_for(lambda: len(down.answered("200")) == 2, 20, "both at the endpoint that recovered")
            await wait_for(lambda: committed(settings), 20, "committed")
        assert [json.loads(c.body)["id"] for c in down.answered("200")] == [first.id, second.id]  # in order
        assert [json.loads(c.body)["id"] for c in up.calls] == [first.id, second.id]


async def test_a_record_that_is_no_notification_is_dead_lettered_whole_and_delivery_goes_on(
    notify_topics: Settings,
) -> None:
    with receivers(([], "200")) as [receiver]:
        settings = deliverer_settings(notify_topics, [receiver.url])
        before, after = notification("cf_liv_webhook_before"), notification("cf_liv_webhook_after", 1)
        await publish_notifications(settings, [before])
        producer = kafka_clients.producer(settings, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            bad = await producer.send_and_wait(settings.notifications_topic, b'{"id": 7}', key=b"cf_liv_webhook_bad")
        finally:
            await producer.stop()
        await publish_notifications(settings, [after])
        async with delivering(settings) as deliverer:
            letters = await read_topic(settings, settings.notifications_dlq_topic, at_least=1, timeout=30)
            await wait_for(lambda: len(receiver.calls) >= 2, 20, "both notifications delivered")
            await wait_for(lambda: committed(settings), 20, "the offsets committed past the bad record")
            stats = deliverer.stats
    assert sorted(json.loads(c.body)["id"] for c in receiver.calls) == sorted([before.id, after.id])
    [letter] = letters
    body = json.loads(letter.value)
    assert body["reason"] == "schema_violation"
    assert "notification" not in body  # tells it apart from an undelivered notification
    assert base64.b64decode(body["original_b64"]) == b'{"id": 7}'
    assert (body["source_topic"], body["source_offset"]) == (settings.notifications_topic, bad.offset)
    assert letter.key == b"cf_liv_webhook_bad"
    assert dict(letter.headers)["dlq.reason"] == b"schema_violation"
    assert (stats.delivered, stats.invalid, stats.dead_lettered) == (2, 1, 0)


async def test_a_large_record_that_is_no_notification_does_not_stop_the_deliveries(notify_topics: Settings) -> None:
    # 400 kB of key and 500 kB of value fit the topic; its letter with the whole key would not
    # (the value grows by a third in base64): the deliverer retried it for ever, committing nothing.
    with receivers(([], "200")) as [receiver]:
        settings = deliverer_settings(notify_topics, [receiver.url])
        producer = kafka_clients.producer(settings, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(settings.notifications_topic, b"x" * 500_000, key=b"k" * 400_000)
        finally:
            await producer.stop()
        after = notification("cf_liv_webhook_after_large", 2)
        await publish_notifications(settings, [after])
        async with delivering(settings):
            letters = await read_topic(settings, settings.notifications_dlq_topic, at_least=1, timeout=30)
            await wait_for(lambda: bool(receiver.calls), 20, "the notification after it delivered")
            await wait_for(lambda: committed(settings), 20, "the offsets committed past the large record")
    [letter] = letters
    assert letter.key == b"k" * 256  # the key cut, as the events' dead letters have it
    assert json.loads(letter.value)["original_size"] == 500_000


async def test_a_deliverer_stopped_mid_retry_loses_nothing(notify_topics: Settings) -> None:
    with receivers(([], "500")) as [receiver]:
        settings = deliverer_settings(notify_topics, [receiver.url], notify_max_attempts=100)
        sent = notification("cf_liv_webhook_stop")
        await publish_notifications(settings, [sent])
        async with delivering(settings):
            await wait_for(lambda: len(receiver.calls) >= 2, 20, "attempts")
        assert not await committed(settings)  # not delivered: not committed
        receiver.then = "200"
        async with delivering(settings):
            await wait_for(lambda: bool(receiver.answered("200")), 20, "the delivery after a restart")
            await wait_for(lambda: committed(settings), 20, "committed")
        assert json.loads(receiver.answered("200")[0].body)["id"] == sent.id


async def test_the_worker_notifies_and_delivers_by_itself(notify_topics: Settings, clickhouse: Any) -> None:
    """METER_NOTIFY_IN_WORKER: events in, a signed webhook out, with no other process."""
    with receivers(([], "200")) as [receiver]:
        settings = deliverer_settings(notify_topics, [receiver.url], notify_in_worker=True)
        clock = Clock()
        worker = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database), clock=clock)
        async with worker.running():
            await publish(settings, settings.events_topic, events("cf_liv_in_worker", 80, clock))
            await wait_for(lambda: bool(receiver.calls), 30, "the webhook")
        [call] = receiver.calls
        assert call.verified
        body = Notification.model_validate_json(call.body)
        assert (body.key_id, body.window, body.threshold, body.count) == ("cf_liv_in_worker", Window.minute, "80%", 80)
