"""Retention from the settings on a store that exists (chDB): a changed dedup horizon or level
TTL reaches the tables, which a migration run once never did."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.cli import cmd_migrate
from worker.settings import Settings
from worker.store.retention import TTL, apply_retention, dedup_memory_hours, ensure_dedup_memory
from worker.store.rollup import LEVELS, rollup_table

pytestmark = [pytest.mark.clickhouse]


def definition(client: Any, database: str, table: str) -> str:
    query = "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}"
    return str(client.query(query, parameters={"db": database, "t": table}).result_rows[0][0])


def test_a_fresh_store_already_has_the_retention_of_its_settings(clickhouse: Any, settings: Settings) -> None:
    # The TTLs restated in worker/store/retention.py are the migrations' own: nothing changes.
    assert apply_retention(clickhouse, settings) == []


def test_a_longer_dedup_horizon_and_shorter_retention_reach_an_existing_store(
    clickhouse: Any, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    db = settings.clickhouse_database
    assert "toIntervalHour(25)" in definition(clickhouse, db, "usage_rollup")
    changed = settings.model_copy(update={"dedup_horizon_hours": 72, "ttl_day_days": 40})

    assert cmd_migrate(argparse.Namespace(release_lock=False), changed) == 0

    printed = capsys.readouterr().out
    assert "schema up to date" in printed
    assert printed.count("retention of ") == len(TTL)  # every table has a day-level TTL
    rollup = definition(clickhouse, db, "usage_rollup")
    assert "toIntervalHour(73)" in rollup  # the dedup memory outlives the horizon the worker accepts
    assert "toIntervalDay(40)" in rollup
    assert "toIntervalDay(40)" in definition(clickhouse, db, "decisions")
    assert apply_retention(clickhouse, changed) == []  # idempotent
    assert apply_retention(clickhouse, settings) == list(TTL)  # and back
    assert "toIntervalHour(25)" in definition(clickhouse, db, "usage_rollup")


def test_a_worker_lengthens_a_dedup_memory_shorter_than_its_horizon_and_never_shortens_it(
    clickhouse: Any, settings: Settings
) -> None:
    db = settings.clickhouse_database
    assert dedup_memory_hours(clickhouse, db) == 25
    longer = settings.model_copy(update={"dedup_horizon_hours": 72})
    assert ensure_dedup_memory(clickhouse, longer) == ["usage_rollup"]  # the others have no dedup TTL
    assert dedup_memory_hours(clickhouse, db) == 73
    # An older worker (24 h) restarting during the rollout leaves the longer memory alone.
    assert ensure_dedup_memory(clickhouse, settings) == []
    assert dedup_memory_hours(clickhouse, db) == 73


def test_every_level_is_kept_as_long_as_its_ttl_says(clickhouse: Any, settings: Settings) -> None:
    """Rows past the minute TTL (7 days) but within the hour TTL: the minute level and its copy
    of 429s (009) go, every level kept by the hour TTL stays; the stored offsets are kept forever."""
    db, old = settings.clickhouse_database, datetime.now(UTC) - timedelta(days=8)
    kept_hourly = ["hour", "client_hour", "client_ips", "client_401"]
    rows = [[level, "k1", old, 429, 1] for level in ["minute", "minute_429", *kept_hourly, "offset"]]
    clickhouse.insert(rollup_table(db), rows, column_names=["level", "key_id", "bucket", "status", "requests"])
    clickhouse.command(f"OPTIMIZE TABLE {rollup_table(db)} FINAL")
    left = clickhouse.query(f"SELECT DISTINCT toString(level) FROM {rollup_table(db)}").result_rows
    assert sorted(level for (level,) in left) == sorted([*kept_hourly, "offset"])
    # Every level but the offsets has a TTL clause: a new level must be added to one.
    assert {level for level in LEVELS if f"'{level}'" not in TTL["usage_rollup"]} == {"offset"}
