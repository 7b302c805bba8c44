"""``meter demo``: the local demo — worker, simulated API traffic, usage read back from ClickHouse."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from schemas.usage import Granularity
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.usage import STEP_SECONDS, usage_series

SHOWN = {Granularity.minute: 8, Granularity.hour: 3, Granularity.day: 2}


async def run_pipeline_demo(settings: Settings, events: int, keys: int) -> None:
    runtime = WorkerRuntime(settings)
    print(f"demo: Kafka at {settings.kafka_bootstrap}, ClickHouse at {settings.clickhouse_dsn}")
    async with runtime.running():
        assert runtime.consumer is not None
        stats = runtime.consumer.stats
        before = stats.consumed
        batch = list(generate(events, Traffic(keys=keys, spread=timedelta(hours=2), seed=int(time.time()))))
        started = time.monotonic()
        await publish(settings.kafka_bootstrap, settings.events_topic, batch)
        print(f"demo: published {len(batch)} request events from 3 simulated API nodes over {keys} keys")
        while stats.consumed - before < len(batch) and time.monotonic() - started < 120:
            await asyncio.sleep(0.2)
        print(f"demo: the worker consumed them in {time.monotonic() - started:.1f}s — {stats.summary()}")

        now = datetime.now(UTC)
        for key_id, published in Counter(e["key_id"] for e in batch).most_common(3):
            print(f"\nkey {key_id}: {published} requests published in this run")
            for granularity, count in SHOWN.items():
                until = now + timedelta(seconds=1)
                since = until - timedelta(seconds=STEP_SECONDS[granularity] * count)
                points = usage_series(
                    runtime.store.client, settings.clickhouse_database, key_id, granularity, since, until, fill=False
                )
                cells = "  ".join(f"{p.bucket.strftime('%d %H:%M')}Z={p.requests}" for p in points)
                print(f"  {granularity.value:>6}: {cells}")
