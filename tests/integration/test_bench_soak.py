"""The soak benchmark's machinery (bench/soak.py) on a small scale, against the real broker and
chDB: a producer process at a steady rate on a simulated clock, samples taken, counts verified."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.ingest import delete_topics
from bench.soak import SoakPlan, judge, run_soak, svg_plot, write_csv
from worker.settings import Settings
from worker.topics import topic_specs

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


async def test_soak_small(make_settings: Callable[..., Settings], unique: str, tmp_path: Path) -> None:
    settings = make_settings(
        events_partitions=3,
        notifications_topic=f"t{unique}.notifications",
        notifications_dlq_topic=f"t{unique}.notifications.dlq",
    )
    # 20,000 events over 2 simulated hours at 10,000/s: ~3,600 simulated seconds a second,
    # a backlog stays far within the 24 h horizon.
    plan = SoakPlan(
        events=20_000,
        keys=2_000,
        partitions=3,
        rate=10_000,
        sim_seconds=2 * 3600,
        warmup_seconds=3600,
        sample_every=0.5,
        stall_seconds=30,
    )
    try:
        run = await run_soak(settings, plan)
    finally:
        await delete_topics(settings, [spec.name for spec in topic_specs(settings)])

    assert run.counted == 20_000
    assert run.dead_lettered == run.duplicates == 0
    assert run.sums == {"minute": 20_000, "hour": 20_000, "day": 20_000}
    assert sum(run.produced_by_partition.values()) == 20_000
    assert len(run.samples) >= 3
    last = run.samples[-1]
    assert last["consumed"] == last["produced"] == 20_000
    assert last["sim_time"] == plan.start() + plan.sim_seconds  # the worker's clock followed the events
    assert 0 < last["live_keys"] <= 2_000
    assert last["dedup_cache_hashes"] == 20_000  # every hash kept: far below the cache's bound
    assert last["rss"] > 0
    assert last["MemoryTracking"] > 0
    assert {"MarkCacheBytes", "PrimaryIndexCacheBytes", "active_parts"} <= last.keys()
    assert "mark_cache_size" in run.caps

    verdict = judge(run)
    assert verdict.warm
    assert all(s["sim_time"] > plan.start() + plan.warmup_seconds for s in verdict.warm)
    write_csv(run, tmp_path / "soak.csv")
    assert len((tmp_path / "soak.csv").read_text().splitlines()) == len(run.samples) + 1
    svg = svg_plot(run, verdict)
    assert svg.startswith("<svg")
    assert svg.count("<polyline") >= 4
