"""429 responses per key, minute and endpoint as their own level (``minute_429`` rows,
009_minute_429.sql): the ingest writes them with each batch, the migration derives them from the
``minute`` rows stored before it (the ingest: test_client_401.py, one worker run for both
levels), and "top keys by 429s" finds its candidates in them alone."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.analytics import TopDimension, TopMetric
from schemas.usage import Granularity
from tests.integration.helpers import MINUTE_429_NOW as NOW
from tests.integration.helpers import MINUTE_COLUMNS as COLUMNS
from tests.integration.helpers import migrations_up_to, stored_429s, traffic
from worker.analytics import queries
from worker.settings import Settings
from worker.store.client import connect
from worker.store.migrations import discover, migrate, render
from worker.store.rollup import mark_copied_level, rollup_table


@pytest.mark.clickhouse
def test_the_migration_derives_the_stored_429s_once(settings: Settings, tmp_path: Path) -> None:
    database = settings.clickhouse_database
    client = connect(settings.clickhouse_dsn, database)
    try:
        migrate(client, settings.model_copy(update={"migrations_dir": migrations_up_to(8, tmp_path / "before")}))
        client.insert(rollup_table(database), traffic(), column_names=COLUMNS)

        assert [m.version for m in migrate(client, settings)] == [9]
        derived = stored_429s(client, database)
        assert len(derived) == 30 * 11

        # Run again (a migration interrupted before it was recorded), or marked by hand: nothing twice.
        [migration] = [m for m in discover() if m.version == 9]
        [statement] = [s for s in render(migration.path.read_text(), settings) if s.startswith("INSERT")]
        client.command(statement)
        mark_copied_level(client, database, "minute_429", int((NOW - timedelta(days=1)).timestamp()))
        assert stored_429s(client, database) == derived

        # An older worker (or a bulk import) adds 429s to a key and minute that has minute_429 rows
        # already, and to a new endpoint: only what is missing is derived.
        minute = NOW - timedelta(minutes=1)
        later = [
            ["minute", "cf_k01", "acct", minute, "/v0/e1", 429, "typical", 4],
            ["minute", "cf_k01", "acct", minute, "/v0/other", 429, "typical", 2],
        ]
        client.insert(rollup_table(database), later, column_names=COLUMNS)
        for _ in range(2):
            mark_copied_level(client, database, "minute_429", int((NOW - timedelta(days=1)).timestamp()))
        assert len(stored_429s(client, database)) == 30 * 11 + 1
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.clickhouse
def test_top_keys_by_429s_rank_from_the_copies(clickhouse: Any, settings: Settings) -> None:
    database = settings.clickhouse_database
    rows = traffic()
    clickhouse.insert(rollup_table(database), rows, column_names=COLUMNS)

    def top() -> list[tuple[str, int, int]]:
        found = queries.top(
            clickhouse, database, TopDimension.key, TopMetric.rate_limited, NOW - timedelta(hours=24), NOW, 5, now=NOW
        )
        assert found.level is Granularity.minute
        return [(e.id, e.rate_limited, e.requests) for e in found.entries]

    # Rows written straight into the table, without their copies: no candidate is found.
    assert top() == []

    mark_copied_level(clickhouse, database, "minute_429", int((NOW - timedelta(days=1)).timestamp()))
    refused = {f"cf_k{i:02d}": 30 * ((i * 7) % 12) for i in range(12)}
    requests = {f"cf_k{i:02d}": 30 * (50 - i) + refused[f"cf_k{i:02d}"] for i in range(12)}
    expected = ["cf_k05", "cf_k10", "cf_k03", "cf_k08", "cf_k01"]  # 11, 10, 9, 8, 7 refused a minute
    assert top() == [(key, refused[key], requests[key]) for key in expected]


@pytest.mark.clickhouse
@pytest.mark.parametrize(("days", "level"), [(30, Granularity.hour), (60, Granularity.day)])
def test_longer_windows_rank_from_their_own_level(
    clickhouse: Any, settings: Settings, days: int, level: Granularity
) -> None:
    """Past 48 hours the window is counted from hour or day rows: their 429s are found there
    (20 days back, the minute rows and their copies are gone), for every dimension."""
    database, old = settings.clickhouse_database, NOW - timedelta(days=20)
    columns = ["level", "key_id", "account_id", "bucket", "endpoint", "status", "requests"]
    rows = [
        [lv, key, account, old, "/v0/e", status, n]
        for lv in ("hour", "day")
        for key, account, status, n in [("cf_a", "acct_a", 429, 5), ("cf_a", "acct_a", 200, 9), ("cf_b", "", 429, 2)]
    ]
    clickhouse.insert(rollup_table(database), rows, column_names=columns)
    since = NOW - timedelta(days=days)
    for dimension, expected in [
        (TopDimension.key, [("cf_a", 5, 14), ("cf_b", 2, 2)]),
        (TopDimension.account, [("acct_a", 5, 14)]),  # keys without an account are left out
        (TopDimension.endpoint, [("/v0/e", 7, 16)]),
    ]:
        found = queries.top(clickhouse, database, dimension, TopMetric.rate_limited, since, NOW, 5, now=NOW)
        assert found.level is level
        assert [(e.id, e.rate_limited, e.requests) for e in found.entries] == expected
