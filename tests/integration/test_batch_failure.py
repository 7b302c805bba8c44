"""A batch that fails before its write (a step of its preparation raising, the broker refusing
a publish) is read again from the last written offsets: nothing is lost, nothing counted twice."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.helpers import db_counts, expected_counts, group_caught_up, wait_for
from worker.app import WorkerRuntime
from worker.ingest.pipeline import scan
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.faults]


async def test_a_batch_failing_before_its_write_is_read_again(topics: Settings, clickhouse: Any) -> None:
    settings = topics.model_copy(update={"batch_max_records": 300})
    events = list(generate(3_000, Traffic(seed=61)))
    runtime = WorkerRuntime(settings, store=RollupStore(clickhouse, settings.clickhouse_database))
    failures = {"left": 3}
    async with runtime.running():
        assert runtime.consumer is not None
        pipeline = runtime.consumer.pipeline
        original = pipeline.prepare
        calls = {"n": 0, "half_scanned": 0}

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            # Fails after part of the batch was sorted (its checked rows taken), three times.
            calls["n"] += 1
            if failures["left"] and calls["n"] % 3 == 0:
                failures["left"] -= 1
                records = args[0]
                half = scan(records[: len(records) // 2], pipeline.checker, {}, (), time.time())
                calls["half_scanned"] += half.aggregate.events
                raise RuntimeError("injected failure before the write")
            return await original(*args, **kwargs)

        pipeline.prepare = flaky  # type: ignore[method-assign]
        await publish(settings.kafka_bootstrap, settings.events_topic, events)
        await wait_for(
            lambda: group_caught_up(settings.kafka_bootstrap, settings.consumer_group, settings.events_topic),
            60,
            "every event written after the failures",
        )
    assert failures["left"] == 0
    assert calls["half_scanned"] > 0  # the failing batches had taken part of their rows first
    assert db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events)
