"""``meter dlq show`` / ``meter dlq replay`` on the real broker and chDB: repeated copies of a
dead letter collapse, a replay re-validates and re-publishes only what now passes, and the
replayed events are counted once."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from common.follower import read_through
from schemas.events import dump_event
from tests.integration.helpers import db_counts, expected_counts, read_topic, wait_for
from worker.app import WorkerRuntime
from worker.cli import main
from worker.ingest.dlq import dead_letter
from worker.ingest.replay import replay_dead_letters
from worker.records import Rejection
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    for name in ("kafka_bootstrap", "events_topic", "dlq_topic", "decisions_topic", "limits_topic"):
        monkeypatch.setenv(f"METER_{name.upper()}", str(getattr(settings, name)))


async def _run(argv: list[str]) -> int:
    return await asyncio.to_thread(main, argv)  # the CLI runs its own event loop


async def _consume_all(settings: Settings, clickhouse: Any, total: int) -> None:
    runtime = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    async with runtime.running():
        await wait_for(
            lambda: runtime.consumer is not None and runtime.consumer.stats.consumed >= total, 60, f"{total} records"
        )


async def test_dlq_show_collapses_copies_and_replay_counts_what_now_passes(
    topics: Settings,
    clickhouse: Any,
    make_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = topics
    now = datetime.now(UTC)
    small = list(generate(20, Traffic(keys=3, seed=11), end=now))
    # Long paths: over a strict METER_MAX_EVENT_BYTES of 400 ("oversized"), fine under the default.
    large = [e | {"endpoint": "/v0/" + "p" * 200} for e in generate(8, Traffic(keys=3, seed=12), end=now)]
    await publish(s.kafka_bootstrap, s.events_topic, small + large)
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(s.events_topic, b"not json %d" % i, key=b"k")
    finally:
        await producer.stop()

    strict = s.model_copy(update={"max_event_bytes": 400})
    await _consume_all(strict, clickhouse, 31)
    dlq = await read_topic(s.kafka_bootstrap, s.dlq_topic)
    assert len(dlq) == 11
    # A worker killed after dead-lettering a batch but before writing it dead-letters it again:
    # the same records, re-published with the same ids.
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    await producer.start()
    try:
        for record in dlq[:4]:
            await producer.send_and_wait(s.dlq_topic, record.value, key=record.key)
    finally:
        await producer.stop()

    # Records that are no dead letters (JSON of other shapes and types, a tombstone) are skipped:
    # they made `dlq show` and `dlq replay` fail as a whole.
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    await producer.start()
    try:
        odd = [b"[]", b"null", b'{"reason": null, "original_b64": ""}', b'{"id": [1], "reason": "x"}', None]
        for value in odd:
            await producer.send_and_wait(s.dlq_topic, value, key=b"odd")
    finally:
        await producer.stop()

    use_settings(monkeypatch, s)
    capsys.readouterr()
    assert await _run(["dlq", "show"]) == 0
    out = capsys.readouterr().out
    assert "11 dead letters (4 repeated copies collapsed)" in out
    assert "oversized        8" in out
    assert "invalid_json     3" in out
    assert await _run(["dlq", "show", "--reason", "invalid_json", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [row["original"] for row in shown] == [f"not json {i}" for i in range(3)]
    assert await _run(["dlq", "show", "--reason", "invalid_json", "--limit", "2", "--format", "json"]) == 0
    assert [row["original"] for row in json.loads(capsys.readouterr().out)] == ["not json 1", "not json 2"]
    assert await _run(["dlq", "show", "--limit", "0", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # none, not all of them

    assert await _run(["dlq", "replay", "--reason", "invalid_json"]) == 0
    out = capsys.readouterr().out
    assert "re-published 0" in out
    assert "still rejected as invalid_json: 3" in out
    assert await _run(["dlq", "replay", "--reason", "oversized", "--dry-run"]) == 0
    assert "would re-publish 8" in capsys.readouterr().out
    assert await _run(["dlq", "replay", "--reason", "oversized"]) == 0
    assert "re-published 8" in capsys.readouterr().out

    # The default bound takes them now; the 31 records before are already written (skipped).
    await _consume_all(s, clickhouse, 8)
    assert db_counts(clickhouse, s.clickhouse_database) == expected_counts(small + large)


async def test_a_replay_kafka_refuses_is_reported_and_exits_1(
    topics: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The events topic takes records of 200 bytes at most; the replayed events are ~340. Before:
    # "re-published 3" and exit 0, with nothing delivered.
    s = topics
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, s.events_topic, configs={"max.message.bytes": "200"})
        await admin.alter_configs([resource])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    await producer.start()
    try:
        for offset, event in enumerate(generate(3, Traffic(keys=3, seed=13), end=datetime.now(UTC))):
            key = event["key_id"].encode()
            rejection = Rejection(
                s.events_topic, 0, offset, "check_failed", "a bug, since fixed", key, dump_event(event)
            )
            value, headers = dead_letter(rejection)
            await producer.send_and_wait(s.dlq_topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    use_settings(monkeypatch, s)
    capsys.readouterr()
    assert await _run(["dlq", "replay", "--reason", "check_failed"]) == 1
    out = capsys.readouterr().out
    assert "re-published 0" in out
    assert "NOT delivered, Kafka refused them: 3" in out
    assert await read_topic(s.kafka_bootstrap, s.events_topic) == []


async def _dead_letters(settings: Settings, n: int) -> list[bytes]:
    """``n`` dead letters of reason ``check_failed`` whose originals pass now; their originals."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20)
    originals = []
    await producer.start()
    try:
        for offset, event in enumerate(generate(n, Traffic(keys=50, seed=17), end=datetime.now(UTC))):
            key = event["key_id"].encode()
            original = dump_event(event)
            value, headers = dead_letter(
                Rejection(settings.events_topic, 0, offset, "check_failed", "a bug, since fixed", key, original)
            )
            await producer.send(settings.dlq_topic, value, key=key, headers=headers)
            originals.append(original)
        await producer.flush()
    finally:
        await producer.stop()
    return originals


async def test_a_replay_sends_as_it_reads_and_holds_no_letter(topics: Settings) -> None:
    # Before: every chosen letter was held until the DLQ was read to its end (a DLQ after an
    # outage can be larger than memory), and the read had to end within 30 s as a whole.
    s = topics
    originals = await _dead_letters(s, 12_000)
    letters, report = await replay_dead_letters(s, "check_failed", None, time.time(), dry_run=False)
    assert (letters.selected, report.passed, report.republished, report.failed) == (12_000, 12_000, 12_000, {})
    assert len(letters.chosen) == 0
    replayed = await read_topic(s.kafka_bootstrap, s.events_topic, at_least=12_000)
    assert sorted(r.value for r in replayed) == sorted(originals)  # each once


async def test_reading_a_topic_through_is_bounded_by_a_stall_not_by_its_length(topics: Settings) -> None:
    s = topics
    await _dead_letters(s, 3_000)
    batches = []

    async def slow(batch: list[Any]) -> None:
        batches.append(len(batch))
        await asyncio.sleep(0.8)  # each batch longer than the wait for the broker: not a stall

    # Before: the whole read had to end within the timeout (and a slow batch counted as a stall).
    await read_through(s, s.dlq_topic, slow, timeout_s=0.5)
    assert sum(batches) == 3_000
    assert len(batches) >= 2


async def test_a_read_through_cancelled_again_during_a_batch_leaves_no_reader(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a second cancel while the reader waited for the batch being handed over skipped the
    # cancel of its follower, which then followed the topic for as long as the process lived.
    from common import retry
    from common.retry import cancel_and_wait

    s = topics
    await _dead_letters(s, 1_000)
    handing_over = asyncio.Event()

    async def slow(batch: list[Any]) -> None:
        handing_over.set()
        await asyncio.sleep(3)

    def followers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "TopicFollower.follow"]

    reading = asyncio.create_task(read_through(s, s.dlq_topic, slow, timeout_s=5))
    await asyncio.wait_for(handing_over.wait(), 10)
    assert followers()
    monkeypatch.setattr(retry, "CANCEL_REPEAT_S", 0.1)  # the second cancel comes during the batch
    await asyncio.wait_for(cancel_and_wait(reading), 10)
    await asyncio.sleep(0.1)
    assert not followers()


async def test_a_replay_of_a_dlq_that_grows_meanwhile_counts_what_it_sent(topics: Settings) -> None:
    # Before: the reader was cancelled once it reached the end seen at its start, in the middle
    # of the batch being sent: letters counted as chosen but neither re-published nor failed
    # (some sent anyway, some never).
    s = topics
    await _dead_letters(s, 4_000)
    stop = asyncio.Event()

    async def trickle() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=5)
        await producer.start()
        try:
            events = generate(20_000, Traffic(keys=50, seed=18), end=datetime.now(UTC))
            for offset, event in enumerate(events):
                if stop.is_set():
                    break
                key = event["key_id"].encode()
                rejection = Rejection(s.events_topic, 1, offset, "check_failed", "a bug", key, dump_event(event))
                value, headers = dead_letter(rejection)
                await producer.send(s.dlq_topic, value, key=key, headers=headers)
                if offset % 20 == 19:
                    await asyncio.sleep(0.002)
        finally:
            await producer.stop()

    growing = asyncio.create_task(trickle())
    letters, report = await replay_dead_letters(s, "check_failed", None, time.time(), dry_run=False)
    stop.set()
    await growing
    assert letters.selected >= 4_000
    assert report.passed == letters.selected
    assert (report.republished, report.failed) == (letters.selected, {})
    replayed = await read_topic(s.kafka_bootstrap, s.events_topic, at_least=report.republished)
    assert len(replayed) == report.republished
