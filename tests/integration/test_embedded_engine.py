"""The embedded store's engine starts with the project's configuration (``worker/store/chdb/``),
and what that configuration changes (smaller squash blocks, for the memory a merge holds while
it rebuilds the ``by_bucket`` projection) keeps the ingest's insert one part and the projection
in every merged part."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pytest

from bench.merge_memory import rollup_batch
from worker.dsn import is_embedded
from worker.settings import Settings
from worker.store.client import engine_profile
from worker.store.rollup import RollupStore

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka]

_MINUTE0 = int(time.time()) // 86_400 * 86_400 - 86_400  # yesterday: inside every TTL
_ENGINE_DEFAULT_SQUASH_ROWS = 1_048_449  # ClickHouse's min_insert_block_size_rows


def _parts(client: Any, database: str) -> list[tuple[str, int]]:
    result = client.query(
        "SELECT name, rows FROM system.parts WHERE database = {db:String} AND table = 'usage_rollup' AND active",
        parameters={"db": database},
    )
    return [(str(name), int(rows)) for name, rows in result.result_rows]


@pytest.fixture
def embedded(clickhouse: Any, settings: Settings) -> Any:
    if not is_embedded(settings.clickhouse_dsn):
        pytest.skip("the engine configuration is the embedded store's (a server has its own)")
    return clickhouse


def test_the_engine_runs_with_the_shipped_profile(embedded: Any) -> None:
    profile = engine_profile()
    assert int(profile["min_insert_block_size_rows"]) < _ENGINE_DEFAULT_SQUASH_ROWS
    result = embedded.query(
        "SELECT name, value FROM system.settings WHERE name IN {names:Array(String)}",
        parameters={"names": list(profile)},
    )
    assert dict(result.result_rows) == profile


def test_an_insert_of_more_rows_than_a_squash_block_is_one_part(embedded: Any, settings: Settings) -> None:
    store = RollupStore(embedded, settings.clickhouse_database)
    embedded.command(f"SYSTEM STOP MERGES {store.table}")
    table = rollup_batch(80_000, 1, 0, _MINUTE0).to_arrow(settings.events_topic)
    assert table.num_rows > 2 * int(engine_profile()["min_insert_block_size_rows"])
    # In chunks smaller than a squash block, as a caller might build it: written as they
    # are, the engine would make a part of every squash block (three here).
    store.write(pa.Table.from_batches(table.to_batches(max_chunksize=50_000)), token="one-part")
    assert [rows for _, rows in _parts(embedded, settings.clickhouse_database)] == [table.num_rows]


def test_a_merge_keeps_the_projection_and_the_answers(embedded: Any, settings: Settings) -> None:
    store = RollupStore(embedded, settings.clickhouse_database)
    for n in range(3):
        store.write(rollup_batch(30_000, n, n * 30_000, _MINUTE0).to_arrow(settings.events_topic), token=f"t{n}")
    # Reads the projection's order: the busiest minutes across keys.
    busiest = (
        f"SELECT bucket, sum(requests) AS r FROM {store.table} WHERE level = 'minute' "
        "AND bucket >= toDateTime({since:UInt32}) GROUP BY bucket ORDER BY r DESC, bucket LIMIT 20"
    )
    before = embedded.query(busiest, parameters={"since": _MINUTE0 + 86_400}).result_rows
    embedded.command(f"OPTIMIZE TABLE {store.table} FINAL")
    parts = _parts(embedded, settings.clickhouse_database)
    assert len(parts) == 1
    ((name, rows),) = parts
    assert rows > int(engine_profile()["min_insert_block_size_rows"])  # rebuilt from several squash blocks
    projection = embedded.query(
        "SELECT sum(rows) FROM system.projection_parts WHERE database = {db:String} AND table = 'usage_rollup' "
        "AND active AND name = 'by_bucket' AND parent_name = {part:String}",
        parameters={"db": settings.clickhouse_database, "part": name},
    ).result_rows
    assert projection == [(rows,)]
    assert embedded.query(busiest, parameters={"since": _MINUTE0 + 86_400}).result_rows == before
