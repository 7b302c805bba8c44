"""Exactly-once through kill -9 of the worker process and through consumer-group rebalances."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.events import RequestEvent
from tests.integration.helpers import (
    BucketCounts,
    db_counts,
    expected_counts,
    group_caught_up,
    group_lag,
    wait_for,
)
from tests.report import record
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.faults]

READ_TOTALS = """
import json, sys
from worker.store.client import connect
from tests.report import record
from tests.integration.helpers import db_counts
client = connect(sys.argv[1], sys.argv[2])
print(json.dumps([[*k, v] for k, v in db_counts(client, sys.argv[2], sys.argv[3]).items()]))
"""


def worker_env(settings: Settings, chdb_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env.update(
        METER_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        METER_EVENTS_TOPIC=settings.events_topic,
        METER_DECISIONS_TOPIC=settings.decisions_topic,
        METER_DLQ_TOPIC=settings.dlq_topic,
        METER_CONSUMER_GROUP=settings.consumer_group,
        METER_CLICKHOUSE_DSN=f"chdb://{chdb_path}",
        METER_CLICKHOUSE_DATABASE=settings.clickhouse_database,
        METER_CONSUMER_SESSION_TIMEOUT_MS="6000",
        METER_BATCH_MAX_RECORDS="2000",
        METER_BATCH_TIMEOUT_MS="50",
        METER_HTTP_PORT="0",
    )
    return env


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "--log-level", "INFO", "worker"], env=env, stdout=log, stderr=log
    )


def totals_in(chdb_path: Path, database: str, measure: str = "requests") -> BucketCounts:
    """Read the worker's chDB directory from a separate process (chDB: one path per process)."""
    out = subprocess.run(
        [sys.executable, "-c", READ_TOTALS, f"chdb://{chdb_path}", database, measure],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    return Counter({(lv, k, int(b)): int(n) for lv, k, b, n in json.loads(out)})


def load(n: int, seed: int) -> list[RequestEvent]:
    return list(generate(n, Traffic(keys=40, spread=timedelta(hours=3), seed=seed)))


async def publish_slowly(settings: Settings, events: list[RequestEvent], chunks: int, pause: float) -> None:
    size = len(events) // chunks + 1
    for i in range(0, len(events), size):
        await publish(settings.kafka_bootstrap, settings.events_topic, events[i : i + size])
        await asyncio.sleep(pause)


KILLS = 10


@pytest.mark.slow
async def test_ten_kill_9_at_random_moments_under_load_count_exactly(topics: Settings, tmp_path: Path) -> None:
    settings = topics
    chdb_path = tmp_path / "worker-chdb"
    env = worker_env(settings, chdb_path)
    rng = random.Random(int.from_bytes(os.urandom(4)))
    events = load(60_000, seed=11)
    # Node retries: a tenth of the events published a second time, later in the stream.
    stream = events + rng.sample(events, 6_000)
    # Sustained load over the whole kill sequence (a restart takes a session timeout, ~6 s).
    producer = asyncio.create_task(publish_slowly(settings, stream, chunks=80, pause=0.9))

    kills = 0
    logs = []
    while kills < KILLS:
        log_path = tmp_path / f"worker-{kills}.log"
        logs.append(log_path)
        proc = start_worker(env, log_path)
        # Kill only once it consumes: after a kill -9 the group waits for the dead
        # member's session to time out before the new worker gets the partitions.
        await wait_for(lambda p=log_path: "resuming after stored offsets" in p.read_text(), 60, "assignment")
        await asyncio.sleep(rng.uniform(0.1, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        kills += 1
    await producer

    final_log = tmp_path / "worker-final.log"
    final = start_worker(env, final_log)
    try:
        await wait_for(lambda: "resuming after stored offsets" in final_log.read_text(), 60, "assignment")
        try:
            await wait_for(
                lambda: group_caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic),
                timeout=120,
                what="the restarted worker to write and commit every event",
            )
        except AssertionError as exc:
            lag = await group_lag(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic)
            raise AssertionError(
                f"{exc}; (committed, end) of the partitions behind: {lag}; final worker "
                f"{'running' if final.poll() is None else f'exited {final.returncode}'}; its log ends:\n"
                + "\n".join(final_log.read_text().splitlines()[-25:])
            ) from None
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(timeout=30)

    resumed_from_stored = sum("resuming after stored offsets {0: 'none" not in p.read_text() for p in logs[1:])
    assert resumed_from_stored >= KILLS // 2, "later workers resume from offsets their killed predecessors stored"
    assert not producer.exception()
    totals = totals_in(chdb_path, settings.clickhouse_database)
    expected = expected_counts(events)
    # Cost-weighted: the simulated traffic has an expensive route (cost 5) and version-1 events
    # without a cost (count 1): every bucket's sum of cost is exact too.
    costs = totals_in(chdb_path, settings.clickhouse_database, "cost")
    record(
        "kill -9 x10 under load",
        events_produced=len(events),
        duplicates_published=len(stream) - len(events),
        kills=kills,
        counted_minute_level=sum(n for (lv, _, _), n in totals.items() if lv == "minute"),
        buckets_equal=totals == expected,
        cost_buckets_equal=costs == expected_counts(events, "cost"),
    )
    assert totals == expected
    assert costs == expected_counts(events, "cost")
    assert costs != totals  # the load does carry costs other than 1
    assert "worker stopped:" in final_log.read_text()  # SIGTERM: graceful, with a summary line


@pytest.mark.slow
async def test_two_consumers_through_rebalances_no_loss_no_double_count(topics: Settings, clickhouse: Any) -> None:
    base = topics
    settings = base.model_copy(update={"batch_max_records": 500})
    store = RollupStore(clickhouse, settings.clickhouse_database)
    events = load(30_000, seed=12)
    stream = events + events[:3_000]  # duplicates too
    producer = asyncio.create_task(publish_slowly(settings, stream, chunks=30, pause=0.3))

    first = WorkerRuntime(settings, store=store)
    second = WorkerRuntime(settings, store=store)
    async with first.running():
        await wait_for(lambda: first.consumer is not None and first.consumer.stats.batches >= 3, 30, "first batches")
        async with second.running():  # 1 -> 2 members: partitions split
            await wait_for(
                lambda: second.consumer is not None and second.consumer.stats.batches >= 3, 60, "second's batches"
            )
            assert first.consumer is not None
            assert second.consumer is not None
            assert first.consumer.owned
            assert second.consumer.owned
            assert not first.consumer.owned & second.consumer.owned
        # 2 -> 1: the second left; the first takes every partition back.
        await producer
        await wait_for(
            lambda: group_caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic),
            timeout=90,
            what="every event written and committed",
        )
    totals = db_counts(clickhouse, settings.clickhouse_database)
    record(
        "rebalance 1->2->1 in process",
        events_produced=len(events),
        duplicates_published=len(stream) - len(events),
        counted_minute_level=sum(n for (lv, _, _), n in totals.items() if lv == "minute"),
        buckets_equal=totals == expected_counts(events),
    )
    assert totals == expected_counts(events)
    costs = db_counts(clickhouse, settings.clickhouse_database, "cost")
    assert costs == expected_counts(events, "cost")
    assert costs != totals  # the load does carry costs other than 1
