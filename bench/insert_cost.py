"""What the embedded engine's side of ingest costs in CPU: the worker's inserts into chDB and
the merges they cause, per 1M events, with the parts of one insert taken out in turn (issue
11, item 1: where the ~7–8 core-seconds per 1M events outside the worker's event-loop thread
go, against the 13.3 the 150,000 events/s target leaves on 2 cores).

    .venv/bin/python -m bench.insert_cost [--events 1000000] [--keys 100000] [--no-write]

The inserts are the worker's own: ``bench.ingest``'s events, cut into fetch-like batches of
``--batch`` records (every partition's records in offset order), checked and aggregated by
the ingest path's ``scan`` and rendered by ``BatchAggregate.to_arrow`` (address counts
included), all before the clock starts. Each variant then writes the same tables into a
fresh database of one chDB engine, one insert per batch as ``RollupStore.write`` does, with
the table's merges stopped, then merges the parts into one (``OPTIMIZE ... FINAL``); the
process's CPU time (every thread) is measured over each of the two. The worker's engine merges
as parts arrive instead, re-merging rows several times: its merge work is more than the one
merge here, which is a floor. Variants:

- ``as migrated``: the table the migrations build (the ``by_bucket`` projection included);
- ``without the projection``: the same table after ``DROP PROJECTION by_bucket``;
- ``without the dedup rows``: as migrated, the dedup memory's rows left out of each insert;
- ``collapsing rows on insert``: as migrated, with the engine's default ``optimize_on_insert=1``
  instead of the worker's 0 (``worker.store.rollup.INSERT_SETTINGS``).

The last three are measurements, not modes of the product: the projection serves the analytics
queries, the dedup rows the exactly-once guarantee; the fourth is the setting before.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bench.common import commit, environment_lines, now_utc, replace_block
from bench.ingest import generate
from worker.ingest.client_ips import ClientAddressCounts
from worker.ingest.pipeline import scan
from worker.records import RecordChecker, Validator
from worker.settings import Settings
from worker.store.client import connect, settings_for_insert
from worker.store.migrations import migrate
from worker.store.rollup import CLIENT_IPS_CAP, LEVELS, RollupStore

TOPIC = "bench.events"


@dataclass(frozen=True, slots=True)
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


@dataclass
class Batch:
    table: pa.Table
    token: str
    events: int


@dataclass(frozen=True)
class Variant:
    """What one variant changes against the worker's own inserts."""

    name: str
    projection: bool = True  # the table keeps its by_bucket projection
    dedup_rows: bool = True  # the inserts carry the dedup memory's rows
    collapse_on_insert: bool = False  # the engine's default optimize_on_insert=1, not INSERT_SETTINGS


VARIANTS = (
    Variant("as migrated"),
    Variant("without the projection", projection=False),
    Variant("without the dedup rows", dedup_rows=False),
    Variant("collapsing rows on insert", collapse_on_insert=True),
)


@dataclass
class Cost:
    variant: str
    insert_cpu: float
    insert_wall: float
    merge_cpu: float
    merge_wall: float
    rows: int
    parts: int


def batches(events: int, keys: int, partitions: int, size: int) -> Iterator[Batch]:
    """The worker's inserts for ``events`` generated events, as its ingest path renders them."""
    now = time.time()
    preload = generate(events, keys, partitions, 42, now)
    checker = RecordChecker(Validator.from_settings(Settings()), None, None)
    addresses = ClientAddressCounts(CLIENT_IPS_CAP)
    per_partition = size // partitions
    longest = max(len(records) for records in preload.partitions.values())
    for start in range(0, longest, per_partition):
        records = [
            _Record(TOPIC, p, offset, key, value)
            for p, pairs in preload.partitions.items()
            for offset, (key, value) in enumerate(pairs[start : start + per_partition], start)
        ]
        scanned = scan(records, checker, {}, (), now + 60)
        aggregate = scanned.aggregate
        client_ips = addresses.observe(*aggregate.addresses())
        yield Batch(aggregate.to_arrow(TOPIC, client_ips), aggregate.token(TOPIC), aggregate.events)


def without_dedup(table: pa.Table) -> pa.Table:
    return table.filter(pc.not_equal(table.column("level"), LEVELS["dedup"]))


def active_parts(client: Any, database: str) -> tuple[int, int]:
    """(parts, rows) of the rollup table."""
    query = (
        "SELECT count(), sum(rows) FROM system.parts WHERE database = {db:String} AND table = 'usage_rollup' AND active"
    )
    parts, rows = client.query(query, parameters={"db": database}).result_rows[0]
    return int(parts), int(rows)


def measure(client: Any, settings: Settings, variant: Variant, work: list[Batch]) -> Cost:
    """One variant in a fresh database: CPU of the inserts (merges stopped), then of merging them."""
    database = settings.clickhouse_database
    client.command(f"DROP DATABASE IF EXISTS {database}")
    migrate(client, settings)
    store = RollupStore(client, database)
    if not variant.projection:
        client.command(f"ALTER TABLE {store.table} DROP PROJECTION by_bucket")
    tables = [batch.table if variant.dedup_rows else without_dedup(batch.table) for batch in work]
    # Merges wait until every insert is in, so each figure is one kind of work only.
    client.command(f"SYSTEM STOP MERGES {store.table}")
    cpu, wall = time.process_time(), time.perf_counter()
    for batch, table in zip(work, tables, strict=True):
        if variant.collapse_on_insert:  # as RollupStore.write, with the engine's default instead of INSERT_SETTINGS
            client.insert_arrow(store.table, table.combine_chunks(), settings=settings_for_insert(batch.token))
        else:
            store.write(table, batch.token)
    insert_cpu, insert_wall = time.process_time() - cpu, time.perf_counter() - wall
    parts = active_parts(client, database)[0]
    client.command(f"SYSTEM START MERGES {store.table}")
    cpu, wall = time.process_time(), time.perf_counter()
    client.command(f"OPTIMIZE TABLE {store.table} FINAL")
    merge_cpu, merge_wall = time.process_time() - cpu, time.perf_counter() - wall
    rows = active_parts(client, database)[1]
    return Cost(variant.name, insert_cpu, insert_wall, merge_cpu, merge_wall, rows, parts)


def report(costs: list[Cost], work: list[Batch], events: int, command: str) -> str:
    scale = 1_000_000 / events
    inserted = sum(batch.table.num_rows for batch in work)
    lines = [
        f"Run {now_utc()} — `{command}` (commit {commit('worker', 'bench/insert_cost.py')}): "
        f"{events:,} events in {len(work)} inserts, one chDB engine, each variant in a fresh database.",
        "",
        f"Rows inserted: {inserted:,} ({inserted / events:.2f} "
        "per event: minute, hour, day and client-hour rows, dedup and offset rows).",
        "",
        "| variant | insert CPU (core-s per 1M events) | merging the parts into one (core-s per 1M) | total | "
        "insert wall (s per 1M) | rows stored (merged) | parts before the merge |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {c.variant} | {c.insert_cpu * scale:.2f} | {c.merge_cpu * scale:.2f} | "
            f"{(c.insert_cpu + c.merge_cpu) * scale:.2f} | {c.insert_wall * scale:.2f} | {c.rows:,} | {c.parts} |"
            for c in costs
        ),
        "",
        "- CPU: the process's (every thread), over the inserts with the table's merges stopped (one part per "
        "insert), then over one `OPTIMIZE ... FINAL` of those parts (a floor for the merge work: the worker's "
        "engine merges as parts arrive, re-merging rows several times).",
        *environment_lines("chdb", "chdb-core", "clickhouse-connect", "pyarrow"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.insert_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=20_000, help="records per insert (the worker's default)")
    parser.add_argument("--no-write", action="store_true", help="do not write results.md")
    args: Any = parser.parse_args(argv)
    print(f"rendering the inserts of {args.events:,} events ...", flush=True)
    work = list(batches(args.events, args.keys, args.partitions, args.batch))
    events = sum(batch.events for batch in work)
    directory = Path(tempfile.mkdtemp(prefix="bench-insert-cost-"))
    try:
        settings = Settings(clickhouse_dsn=f"chdb://{directory}", clickhouse_database="insert_cost")
        client = connect(settings.clickhouse_dsn)
        costs = []
        for variant in VARIANTS:
            costs.append(measure(client, settings, variant, work))
            c = costs[-1]
            print(f"{variant.name}: insert {c.insert_cpu:.2f} core-s ({c.insert_wall:.2f} s), merges {c.merge_cpu:.2f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    command = f"python -m bench.insert_cost --events {args.events} --keys {args.keys}"
    body = report(costs, work, events, command)
    print(body)
    if not args.no_write:
        replace_block("insert_cost", "Ingest", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
