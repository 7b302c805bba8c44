"""401 responses per key, hour and client address as their own level (``client_401`` rows,
008_client_401.sql): the ingest writes them with each batch (and the 429s' ``minute_429`` rows,
test_minute_429.py), the migration derives them from the ``client_hour`` rows stored before it,
and the invalid-key storm signal reads only them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import days_ago, db_counts, expected_counts, migrations_up_to, stored_429s, wait_for
from worker.analytics import signals
from worker.app import WorkerRuntime
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish
from worker.store.client import connect
from worker.store.migrations import discover, migrate, render
from worker.store.rollup import mark_copied_level, rollup_table

COLUMNS = ["level", "key_id", "account_id", "bucket", "status", "client_ip", "requests"]
HOUR = days_ago(3, 9)  # recent: a pinned date would age past the hour level's TTL


DAY_BEFORE = int((HOUR - timedelta(days=1)).timestamp())  # the bound of the re-derivations below


def client_401(clickhouse: Any, database: str) -> list[tuple[str, int, str, int]]:
    """(key, hour, address, requests) of the ``client_401`` rows, summed over parts."""
    rows = clickhouse.query(
        f"SELECT key_id, toUInt32(bucket), client_ip, sum(requests) FROM {rollup_table(database)} "
        "WHERE level = 'client_401' GROUP BY key_id, bucket, client_ip ORDER BY key_id, bucket, client_ip"
    ).result_rows
    return [(str(k), int(b), str(ip), int(n)) for k, b, ip, n in rows]


def client_hour_401(clickhouse: Any, database: str) -> list[tuple[str, int, str, int]]:
    rows = clickhouse.query(
        f"SELECT key_id, toUInt32(bucket), client_ip, sum(requests) FROM {rollup_table(database)} "
        "WHERE level = 'client_hour' AND status = 401 AND client_ip != '' "
        "GROUP BY key_id, bucket, client_ip ORDER BY key_id, bucket, client_ip"
    ).result_rows
    return [(str(k), int(b), str(ip), int(n)) for k, b, ip, n in rows]


@pytest.mark.clickhouse
def test_the_migration_derives_the_stored_401s_once(settings: Settings, tmp_path: Path) -> None:
    client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    try:
        migrate(client, settings.model_copy(update={"migrations_dir": migrations_up_to(7, tmp_path / "before")}))
        guesses = [["client_hour", f"cf_guess_{i}", "", HOUR, 401, "203.0.113.66", 3] for i in range(40)]
        others = [["client_hour", "cf_real", "acct", HOUR, 200, "203.0.113.66", 9]]
        client.insert(rollup_table(settings.clickhouse_database), guesses + others, column_names=COLUMNS)

        upgrade = settings.model_copy(update={"migrations_dir": migrations_up_to(8, tmp_path / "upgrade")})
        assert [m.version for m in migrate(client, upgrade)] == [8]
        derived = client_401(client, settings.clickhouse_database)
        assert derived == client_hour_401(client, settings.clickhouse_database)
        assert len(derived) == 40

        # Run again (a migration interrupted before it was recorded), or marked by hand: nothing twice.
        [migration] = [m for m in discover() if m.version == 8]
        [statement] = [s for s in render(migration.path.read_text(), settings) if s.startswith("INSERT")]
        client.command(statement)
        mark_copied_level(
            client, settings.clickhouse_database, "client_401", int((HOUR - timedelta(days=1)).timestamp())
        )
        assert client_401(client, settings.clickhouse_database) == derived

        th = signals.SignalThresholds(invalid_key_401_min=100, lookback=timedelta(hours=24))
        [storm] = signals.invalid_key_storms(client, settings.clickhouse_database, HOUR + timedelta(hours=1), th)
        assert (storm.client_ip, storm.evidence) == ("203.0.113.66", {"status_401": 120, "distinct_keys": 40})

        # An older worker (or a bulk import) adds 401s to a key and hour that has client_401 rows
        # already, from the same address and a new one: only what is missing is derived.
        later = [
            ["client_hour", "cf_guess_0", "", HOUR, 401, "203.0.113.66", 2],
            ["client_hour", "cf_guess_0", "", HOUR, 401, "198.51.100.9", 5],
        ]
        client.insert(rollup_table(settings.clickhouse_database), later, column_names=COLUMNS)
        for _ in range(2):
            mark_copied_level(
                client, settings.clickhouse_database, "client_401", int((HOUR - timedelta(days=1)).timestamp())
            )
        assert client_401(client, settings.clickhouse_database) == client_hour_401(client, settings.clickhouse_database)
        assert len(client_401(client, settings.clickhouse_database)) == 41
    finally:
        client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")


@pytest.mark.kafka
@pytest.mark.clickhouse
async def test_the_ingest_writes_each_batchs_401s_and_429s_as_their_own_levels(
    topics: Settings, clickhouse: Any
) -> None:
    settings = topics
    events = list(generate(400, Traffic(seed=7, keys=20)))
    for j, event in enumerate(events):
        event["client_ip"] = f"198.51.100.{j % 5}"
        if j % 3 < 2:
            event["status"] = 401 if j % 3 == 0 else 429
    async with WorkerRuntime(settings).running():
        await publish(settings.kafka_bootstrap, settings.events_topic, events)
        await wait_for(
            lambda: db_counts(clickhouse, settings.clickhouse_database) == expected_counts(events), 60, "every event"
        )
    derived = client_401(clickhouse, settings.clickhouse_database)
    assert derived == client_hour_401(clickhouse, settings.clickhouse_database)
    assert sum(n for *_, n in derived) == sum(1 for e in events if e["status"] == 401)
    copied = stored_429s(clickhouse, settings.clickhouse_database)  # the minute_429 rows (009)
    assert sum(n for *_, n in copied) == sum(1 for e in events if e["status"] == 429)
