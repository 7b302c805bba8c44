"""Fixtures of the integration tests that read the analytics sample (tests/conftest.py has the
broker, the settings and the ClickHouse database)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from worker.analytics.sample import SampleFacts, seed_sample
from worker.settings import Settings


@pytest.fixture
def now() -> datetime:
    """Late in the current hour, so the whole sample "last hour" falls in the current hour and day."""
    return datetime.now(UTC).replace(minute=59, second=30, microsecond=0)


@pytest.fixture
def sample(clickhouse: Any, settings: Settings, now: datetime) -> SampleFacts:
    """The analytics sample (worker.analytics.sample) in the test's database, as of ``now``."""
    return seed_sample(clickhouse, settings.clickhouse_database, now)
