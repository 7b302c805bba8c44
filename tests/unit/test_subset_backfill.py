"""A level that copies another level's rows of one status is derived twice in SQL: by the
migration that adds it (the rows stored before it) and by ``worker.store.rollup`` (bulk imports,
the sample data). Both must write the same rows: the same statement but for the time bound."""

from __future__ import annotations

import re

import pytest

from worker.settings import Settings
from worker.store import rollup
from worker.store.migrations import discover, render

_SINCE = "AND bucket >= toDateTime({since:UInt32}, 'UTC') "


def one_line(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


@pytest.mark.parametrize("level", sorted(rollup.COPIED_LEVELS))
def test_the_migration_backfills_what_the_rollup_marks(level: str) -> None:
    """Each copied level has the migration that adds it (NNN_<level>.sql), whose backfill of the
    stored rows is the statement ``mark_copied_level`` runs, apart from its time bound."""
    settings = Settings(clickhouse_database="meter_x")
    [migration] = [m for m in discover() if m.path.stem.endswith(f"_{level}")]
    [backfill] = [s for s in render(migration.path.read_text(encoding="utf-8"), settings) if s.startswith("INSERT")]
    marks = rollup.COPIED_LEVELS[level].missing.format(table=rollup.rollup_table(settings.clickhouse_database))
    assert _SINCE in marks
    assert one_line(backfill) == one_line(marks.replace(_SINCE, ""))
