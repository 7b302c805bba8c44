"""The ingest counts each key's distinct client addresses per day (``client_ips`` rows) as it
writes batches, and a worker taking partitions over goes on from the stored addresses: the
counts are those of the events, and the leaked-key signal finds its keys from them."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest

from tests.integration.helpers import db_counts, expected_counts, wait_for
from worker.analytics import signals
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import CLIENT_IPS_CAP, RollupStore, rollup_table

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def stored_counts(clickhouse: Any, database: str) -> dict[tuple[str, int], int]:
    rows = clickhouse.query(
        f"SELECT key_id, toUInt32(bucket), max(client_ips) FROM {rollup_table(database)} "
        "WHERE level = 'client_ips' GROUP BY key_id, bucket"
    ).result_rows
    return {(str(k), int(d)): int(n) for k, d, n in rows}


async def test_address_counts_follow_the_events_across_a_takeover(topics: Settings, clickhouse: Any) -> None:
    settings = topics
    events = list(generate(600, Traffic(seed=41, keys=30)))
    for j, event in enumerate(events):
        event["client_ip"] = f"10.0.{j % 45}.{j % 3}"  # up to 135 addresses, repeats
    truth: dict[tuple[str, int], set[str]] = defaultdict(set)
    for e in events:
        epoch = int(e["ts"].timestamp())
        truth[(e["key_id"], epoch - epoch % 86_400)].add(e["client_ip"])
    store = RollupStore(clickhouse, settings.clickhouse_database)
    half = len(events) // 2
    for start, end in ((0, half), (half, len(events))):
        # A new worker for each half: the second starts from what the first stored.
        worker = WorkerRuntime(settings, store=store)
        async with worker.running():
            await publish(settings.kafka_bootstrap, settings.events_topic, events[start:end])
            written = events[:end]
            await wait_for(
                lambda w=written: db_counts(clickhouse, settings.clickhouse_database) == expected_counts(w),
                60,
                "the half written",
            )
    expected = {cell: min(len(ips), CLIENT_IPS_CAP) for cell, ips in truth.items() if len(ips) >= 2}
    assert any(n < CLIENT_IPS_CAP for n in expected.values())  # not every count is capped
    assert stored_counts(clickhouse, settings.clickhouse_database) == expected

    th = signals.SignalThresholds(client_ips_min=10, lookback=timedelta(hours=24), max_per_kind=1000)
    found = signals.many_sources(clickhouse, settings.clickhouse_database, max(e["ts"] for e in events), th)
    window = {key for (key, _), ips in truth.items() if len(ips) >= 10}
    assert {s.key_id for s in found} >= window - {None}
