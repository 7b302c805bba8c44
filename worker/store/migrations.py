"""Versioned, idempotent DDL migrations: ``NNN_name.sql`` files shipped with the package
(``worker/store/sql/``, read through ``importlib.resources``, so an installed package has
them wherever it is installed), or from ``METER_MIGRATIONS_DIR`` when that is set."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib.abc import Traversable
from importlib.resources import files

from clickhouse_connect.driver.client import Client

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
    r"^(CREATE\s+(?:TABLE|VIEW|DATABASE)\s+IF\s+NOT\s+EXISTS\s+\S+|ALTER\s+TABLE\s+\S+)", re.IGNORECASE
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
    done = {row[0] for row in client.query(f"SELECT version FROM {db}.schema_migrations").result_rows}
    applied = []
    for migration in discover(settings.migrations_dir):
        if migration.version in done:
            continue
        for statement in render(migration.path.read_text(encoding="utf-8"), settings):
            client.command(statement)
        client.insert(
            f"{db}.schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"]
        )
        log.info("applied migration %03d_%s", migration.version, migration.name)
        applied.append(migration)
    return applied
