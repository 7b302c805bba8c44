"""Versioned, idempotent DDL migrations: ``NNN_name.sql`` files shipped with the package
(``worker/store/sql/``, read through ``importlib.resources``, so an installed package has
them wherever it is installed), or from ``METER_MIGRATIONS_DIR`` when that is set."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.abc import Traversable
from importlib.resources import files

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from worker.dsn import is_embedded
from worker.settings import Settings
from worker.store.client import quote_identifier

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One ``NNN_name.sql`` file of the shipped migrations."""

    version: int
    name: str
    path: Traversable


def shipped() -> Traversable:
    """The migrations that come with the package."""
    return files("worker.store").joinpath("sql")


def discover(directory: Traversable | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default: the shipped ones), in version order."""
    directory = shipped() if directory is None else directory
    found = []
    for path in sorted((p for p in directory.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file name must look like 001_name.sql: {path}")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return found


def retention(settings: Settings) -> dict[str, int]:
    """The TTL placeholders of the migrations (and of ``worker.store.retention``), from settings."""
    return {
        "ttl_minute_days": settings.ttl_minute_days,
        "ttl_hour_days": settings.ttl_hour_days,
        "ttl_day_days": settings.ttl_day_days,
        "dedup_ttl_hours": settings.dedup_horizon_hours + 1,  # an hour past the horizon accepted
    }


def render(sql: str, settings: Settings) -> list[str]:
    """Fill the placeholders (all from settings) and split into statements."""
    text = sql.format(db=quote_identifier(settings.clickhouse_database), **retention(settings))
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    statements = [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]
    return (
        [for_cluster(stmt, settings.clickhouse_cluster) for stmt in statements]
        if settings.clickhouse_cluster
        else statements
    )


# DDL that names a table or a database: where ``ON CLUSTER`` goes (after the name).
_DDL_TARGET = re.compile(
    r"^(CREATE\s+(?:TABLE|VIEW|DATABASE)\s+(?:IF\s+NOT\s+EXISTS\s+)?\S+|ALTER\s+TABLE\s+\S+"
    r"|DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?\S+)",
    re.IGNORECASE,
)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(ReplacingMergeTree|AggregatingMergeTree|MergeTree)\b")


def for_cluster(statement: str, cluster: str) -> str:
    """The statement for every server of ``cluster``: ``ON CLUSTER``, and Replicated engines
    (their ZooKeeper path and replica name from the servers' ``default_replica_path`` and
    ``default_replica_name``). Each worker still inserts into the table on its own server:
    one insert is one part there, replicated as a whole, and its deduplication token is
    checked by the replicated table (``replicated_deduplication_window``)."""
    if not cluster:
        return statement
    on_cluster = f"ON CLUSTER {quote_identifier(cluster)}"
    statement = _DDL_TARGET.sub(lambda m: f"{m.group(1)} {on_cluster}", statement, count=1)
    statement = _ENGINE.sub(lambda m: f"ENGINE = Replicated{m.group(1)}", statement)
    return statement.replace("non_replicated_deduplication_window", "replicated_deduplication_window")


# -- one run at a time ---------------------------------------------------------------------
# Every worker applies the pending migrations when it starts, so workers started together on a
# ClickHouse server (a deployment's new replicas) run them at the same time. The DDL is
# idempotent, but a backfill (``INSERT ... SELECT`` of what a new level lacks: 008, 009) is not
# when two runs read before either writes. The lock is a table: ``CREATE TABLE`` without
# ``IF NOT EXISTS`` succeeds for exactly one caller (on a cluster the DDL queue orders the
# callers alike on every server); the others wait for it to go, then find the migrations
# applied. A run killed while holding it leaves the table. On the embedded engine the next run
# takes it over at once (only one process can open that store, so the holder is gone); on a
# server, waiters give up after ``METER_MIGRATION_LOCK_WAIT_SECONDS`` naming the holder and
# ``meter migrate --release-lock``.

LOCK_TABLE = "schema_migrations_lock"
_POLL_SECONDS = 0.5
_LOG_EVERY_SECONDS = 10.0


class MigrationLocked(Exception):
    """Another migration run has held the lock for longer than the wait allows."""


def holder_name() -> str:
    """Who takes the lock: enough for an operator to find the process."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def _table(settings: Settings) -> str:
    return f"{quote_identifier(settings.clickhouse_database)}.{LOCK_TABLE}"


def lock_statements(settings: Settings, holder: str) -> tuple[str, str]:
    """(take, drop) the lock. The holder is the table's comment: written by the one statement
    that takes the lock, so a lock is never without it."""
    comment = holder.replace("\\", "\\\\").replace("'", "\\'")
    take = f"CREATE TABLE {_table(settings)} (held UInt8) ENGINE = MergeTree ORDER BY tuple() COMMENT '{comment}'"
    drop = for_cluster(f"DROP TABLE IF EXISTS {_table(settings)}", settings.clickhouse_cluster)
    return for_cluster(take, settings.clickhouse_cluster), drop + (" SYNC" if settings.clickhouse_cluster else "")


def _exists_already(exc: DatabaseError) -> bool:
    return "TABLE_ALREADY_EXISTS" in str(exc) or "Code: 57." in str(exc)


def _holder(client: Client, settings: Settings) -> str | None:
    """Who holds the lock and since when; None: no one (released meanwhile)."""
    rows = client.query(
        "SELECT comment FROM system.tables WHERE database = {db:String} AND name = {name:String}",
        parameters={"db": settings.clickhouse_database, "name": LOCK_TABLE},
    ).result_rows
    return str(rows[0][0]) if rows else None


# The holders of this process's runs that hold the lock now, and a mutex over taking, dropping
# and judging it: no other thread can read a lock this process just took as anyone else's.
_held: set[str] = set()
_held_guard = threading.Lock()


def try_acquire(client: Client, settings: Settings) -> str | None:
    """Take the lock if no one holds it; the holder name written (None: someone holds it)."""
    since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    # The token tells two runs of one process apart (threads share the pid and the second).
    holder = f"{holder_name()} since {since} UTC, run {secrets.token_hex(4)}"
    take, _ = lock_statements(settings, holder)
    with _held_guard:
        try:
            client.command(take)
        except DatabaseError as exc:
            if _exists_already(exc):
                return None
            # The statement may have taken effect although its answer failed (an ON CLUSTER DDL
            # that timed out waiting for a host that is down): then the lock is this run's.
            try:
                ours = _holder(client, settings) == holder
            except DatabaseError:
                ours = False
            if not ours:
                raise
            log.warning("the migration lock was taken although its statement failed (%s)", str(exc)[:200])
        _held.add(holder)
    return holder


def left_by_a_dead_run(holder: str, settings: Settings) -> bool:
    """Whether a lock held by ``holder`` was left by a run that died. Known only on the embedded
    engine: no other process can open its store while this one has it (``connect`` refuses),
    so a holder that is none of this process's runs is a run that ended without releasing."""
    return is_embedded(settings.clickhouse_dsn) and holder not in _held


def take_over_if_dead(client: Client, settings: Settings) -> bool:
    """Drop the lock if a run that died left it (``left_by_a_dead_run``)."""
    with _held_guard:
        holder = _holder(client, settings)  # read again under the guard: it may be new now
        if holder is None or not left_by_a_dead_run(holder, settings):
            return False
        log.warning(
            "taking over the migration lock on %s: %s held it, a run that ended without releasing it "
            "(the embedded store is open in this process only)",
            settings.clickhouse_database,
            holder,
        )
        release(client, settings)
        return True


def release(client: Client, settings: Settings) -> None:
    """Drop the lock (also what ``meter migrate --release-lock`` does for a run that died)."""
    client.command(lock_statements(settings, "")[1])


@contextlib.contextmanager
def migration_lock(client: Client, settings: Settings) -> Iterator[None]:
    """Hold the lock for the ``with`` block, waiting up to ``migration_lock_wait_seconds``."""
    started = time.monotonic()
    next_log = 0.0
    retried = False
    while (ours := try_acquire(client, settings)) is None:
        holder = _holder(client, settings)
        if holder is not None and left_by_a_dead_run(holder, settings) and take_over_if_dead(client, settings):
            continue
        if holder is None and not retried:
            retried = True  # released between the two calls: try again at once (once)
            continue
        retried = False
        holder = holder or "a holder this server does not list"
        waited = time.monotonic() - started
        if waited >= settings.migration_lock_wait_seconds:
            raise MigrationLocked(
                f"another migration run holds the lock on {settings.clickhouse_database} ({holder}); "
                f"waited {waited:.0f} s (METER_MIGRATION_LOCK_WAIT_SECONDS). If no migration is "
                "running (its process was killed), run `meter migrate --release-lock`, then start again"
            )
        if waited >= next_log:
            log.info("waiting for the migration lock on %s, held by %s", settings.clickhouse_database, holder)
            next_log = waited + _LOG_EVERY_SECONDS
        time.sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        with _held_guard:
            try:
                release(client, settings)
            finally:  # a failed drop leaves a table to take over, not a run this process waits for
                _held.discard(ours)


def migrate(client: Client, settings: Settings) -> list[Migration]:
    """Apply every migration not yet recorded; return those applied now."""
    db = quote_identifier(settings.clickhouse_database)
    cluster = settings.clickhouse_cluster
    client.command(for_cluster(f"CREATE DATABASE IF NOT EXISTS {db}", cluster))
    client.command(
        for_cluster(
            f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
            "(version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) "
            "ENGINE = ReplacingMergeTree ORDER BY version",
            cluster,
        )
    )
    if not _pending(client, settings):
        return []
    applied = []
    with migration_lock(client, settings):
        for migration in _pending(client, settings):  # read again: a run we waited for applied them
            for statement in render(migration.path.read_text(encoding="utf-8"), settings):
                client.command(statement)
            client.insert(
                f"{db}.schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"]
            )
            log.info("applied migration %03d_%s", migration.version, migration.name)
            applied.append(migration)
    return applied


def _pending(client: Client, settings: Settings) -> list[Migration]:
    """The migrations not recorded as applied (on a cluster: on this server's shard, once its
    replica has every record the others wrote)."""
    db = quote_identifier(settings.clickhouse_database)
    if settings.clickhouse_cluster:
        client.command(f"SYSTEM SYNC REPLICA {db}.schema_migrations")
    done = {row[0] for row in client.query(f"SELECT version FROM {db}.schema_migrations").result_rows}
    return [m for m in discover(settings.migrations_dir) if m.version not in done]
