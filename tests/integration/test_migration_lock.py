"""Migrations run one at a time per database: workers started together apply a backfill once,
a lock left by a killed run is taken over on the embedded engine, and named in the error and
released by `meter migrate --release-lock` on a server."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from tests.integration.helpers import MINUTE_COLUMNS, migrations_up_to, stored_429s, traffic
from worker.cli import build_parser, run_command
from worker.dsn import is_embedded
from worker.settings import Settings
from worker.store.client import connect
from worker.store.migrations import (
    LOCK_TABLE,
    Migration,
    MigrationLocked,
    holder_name,
    lock_statements,
    migrate,
    release,
    try_acquire,
)
from worker.store.rollup import rollup_table


@pytest.mark.clickhouse
def test_workers_started_together_apply_a_backfill_once(settings: Settings, tmp_path: Path) -> None:
    database = settings.clickhouse_database
    first, second = (connect(settings.clickhouse_dsn, database) for _ in range(2))
    try:
        migrate(first, settings.model_copy(update={"migrations_dir": migrations_up_to(8, tmp_path / "before")}))
        first.insert(rollup_table(database), traffic(minutes=300), column_names=MINUTE_COLUMNS)

        together = threading.Barrier(2)
        applied: dict[int, list[Migration]] = {}

        def start_worker(i: int) -> None:
            together.wait()
            applied[i] = migrate((first, second)[i], settings)

        threads = [threading.Thread(target=start_worker, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(len(a) for a in applied.values()) == [0, 1]  # one ran 009; the other found it done
        assert len(stored_429s(first, database)) == 300 * 11  # equal to the minute rows: not twice
        assert first.query(f"SHOW TABLES FROM {database} LIKE 'schema_migrations_lock'").result_rows == []
    finally:
        first.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.clickhouse
def test_a_lock_left_by_a_killed_run_is_named_and_released_by_the_cli(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = settings.clickhouse_database
    client = connect(settings.clickhouse_dsn, database)
    try:
        migrate(client, settings.model_copy(update={"migrations_dir": migrations_up_to(8, tmp_path / "before")}))
        assert try_acquire(client, settings)  # a run that holds it (this process: alive, on any engine)
        assert not try_acquire(client, settings)

        impatient = settings.model_copy(update={"migration_lock_wait_seconds": 1.0})
        started = datetime.now(UTC)
        with pytest.raises(MigrationLocked) as refused:
            migrate(client, impatient)
        assert datetime.now(UTC) - started < timedelta(seconds=10)
        assert holder_name() in str(refused.value)
        assert "meter migrate --release-lock" in str(refused.value)
        assert run_command(build_parser().parse_args(["migrate"]), impatient) == 2
        assert "meter migrate: another migration run holds the lock" in capsys.readouterr().err

        assert run_command(build_parser().parse_args(["migrate", "--release-lock"]), impatient) == 0
        assert [m.version for m in migrate(client, impatient)] == [9]
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.clickhouse
def test_a_lock_left_in_the_embedded_store_is_taken_over_at_once(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded engine's one worker was killed while migrating and starts again (in a
    container: same host name, same pid 1). It must not wait METER_MIGRATION_LOCK_WAIT_SECONDS
    for itself; the backfill runs once. Runs of this process that hold the lock are not taken
    over (test_workers_started_together_apply_a_backfill_once)."""
    if not is_embedded(settings.clickhouse_dsn):
        pytest.skip("on a server the holder may be alive elsewhere: waited for (the test above)")
    database = settings.clickhouse_database
    client = connect(settings.clickhouse_dsn, database)
    try:
        migrate(client, settings.model_copy(update={"migrations_dir": migrations_up_to(8, tmp_path / "before")}))
        client.insert(rollup_table(database), traffic(minutes=300), column_names=MINUTE_COLUMNS)
        holder = f"{holder_name()} since 2026-12-03 00:00:00 UTC, run 0a1b2c3d"  # the killed run's
        client.command(lock_statements(settings, holder)[0])

        caplog.set_level(logging.WARNING, logger="worker.store.migrations")
        started = time.monotonic()
        applied = migrate(client, settings.model_copy(update={"migration_lock_wait_seconds": 60.0}))
        assert time.monotonic() - started < 30
        assert [m.version for m in applied] == [9]
        assert len(stored_429s(client, database)) == 300 * 11
        assert f"taking over the migration lock on {database}: {holder} held it" in caplog.text
        assert client.query(f"SHOW TABLES FROM {database} LIKE 'schema_migrations_lock'").result_rows == []
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.clickhouse
def test_a_lock_whose_release_failed_is_taken_over_by_the_next_run_of_the_process(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not is_embedded(settings.clickhouse_dsn):
        pytest.skip("the takeover is the embedded engine's")
    database = settings.clickhouse_database
    client = connect(settings.clickhouse_dsn, database)
    real_command = client.command

    def drop_fails(statement: str, *args: object, **kwargs: object) -> object:
        if statement.startswith("DROP TABLE IF EXISTS") and LOCK_TABLE in statement:
            raise DatabaseError("Code: 999. DB::Exception: the drop failed (test)")
        return real_command(statement, *args, **kwargs)  # type: ignore[arg-type]

    try:
        before = settings.model_copy(update={"migrations_dir": migrations_up_to(8, tmp_path / "before")})
        monkeypatch.setattr(client, "command", drop_fails)
        with pytest.raises(DatabaseError, match="the drop failed"):
            migrate(client, before)  # applied 001-008; the lock stays behind
        monkeypatch.setattr(client, "command", real_command)
        started = time.monotonic()
        applied = migrate(client, settings.model_copy(update={"migration_lock_wait_seconds": 60.0}))
        assert time.monotonic() - started < 30  # not the wait: no run of this process holds it
        assert [m.version for m in applied] == [9]
    finally:
        monkeypatch.setattr(client, "command", real_command)
        client.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.clickhouse
def test_a_lock_taken_by_a_statement_whose_answer_failed_is_this_runs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ON CLUSTER DDL can time out (a host is down) after the lock was created: the run finds
    its own name on it and goes on, instead of waiting for itself. A failure that took nothing
    is raised."""
    database = settings.clickhouse_database
    client = connect(settings.clickhouse_dsn, database)
    real_command = client.command

    def answer_lost(statement: str, *args: object, **kwargs: object) -> object:
        real_command(statement, *args, **kwargs)  # type: ignore[arg-type]
        raise DatabaseError("Code: 159. DB::Exception: Distributed DDL task is not finished (TIMEOUT_EXCEEDED)")

    def refused(statement: str, *args: object, **kwargs: object) -> object:
        raise DatabaseError("Code: 210. DB::Exception: Connection refused (NETWORK_ERROR)")

    try:
        monkeypatch.setattr(client, "command", answer_lost)
        assert try_acquire(client, settings)
        monkeypatch.setattr(client, "command", real_command)
        assert not try_acquire(client, settings)  # held: by the first call
        release(client, settings)

        monkeypatch.setattr(client, "command", refused)
        with pytest.raises(DatabaseError, match="NETWORK_ERROR"):
            try_acquire(client, settings)
    finally:
        monkeypatch.setattr(client, "command", real_command)
        client.command(f"DROP DATABASE IF EXISTS {database}")
