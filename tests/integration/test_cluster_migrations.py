"""The migrations' cluster variant (METER_CLICKHOUSE_CLUSTER): every statement is valid
ClickHouse SQL (parsed by the real engine), every DDL statement runs ON CLUSTER, and creates
Replicated tables whose insert deduplication is the replicated one (the migration lock's
statements too). A backfill (INSERT ... SELECT) runs on the server the migrating worker uses
(docs/scaling.md)."""

from __future__ import annotations

from typing import Any

from worker.settings import Settings
from worker.store.migrations import discover, for_cluster, lock_statements, render


def _statements(settings: Settings) -> list[str]:
    return [st for m in discover() for st in render(m.path.read_text(encoding="utf-8"), settings)]


def test_every_cluster_statement_parses_and_runs_on_the_cluster(settings: Settings, clickhouse: Any) -> None:
    single = _statements(settings) + list(lock_statements(settings, "host pid 1"))
    on_cluster = settings.model_copy(update={"clickhouse_cluster": "meter_cluster"})
    cluster = _statements(on_cluster) + list(lock_statements(on_cluster, "host pid 1"))  # the migration lock
    assert len(cluster) == len(single) > 0
    for statement in cluster:
        # formatQuery parses without running: a syntax error raises.
        formatted = clickhouse.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows[0][0]
        if statement.startswith("INSERT"):
            assert statement in single  # INSERT has no ON CLUSTER: the same statement
        else:
            assert "ON CLUSTER meter_cluster" in formatted, statement
        assert "non_replicated_deduplication_window" not in formatted
    creates = [st for st in cluster if st.upper().startswith("CREATE TABLE")]
    assert creates
    assert all("ENGINE = Replicated" in st for st in creates)
    assert any("replicated_deduplication_window" in st for st in creates)  # the rollup's insert tokens
    assert any(st.startswith("INSERT") for st in cluster)  # the branch above is taken (008's backfill)
    assert cluster[-1].endswith(" SYNC")  # the lock's drop waits for every server


def test_without_a_cluster_the_statements_are_unchanged(settings: Settings) -> None:
    assert settings.clickhouse_cluster == ""
    assert [for_cluster(st, "") for st in _statements(settings)] == _statements(settings)
