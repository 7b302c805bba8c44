"""Retention from the settings on a store that exists (chDB): a changed dedup horizon or level
TTL reaches the tables, which a migration run once never did."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from worker.cli import cmd_migrate
from worker.settings import Settings
from worker.store.retention import TTL, apply_retention, dedup_memory_hours, ensure_dedup_memory

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
