"""The abuse signals with their leaked-key scan on a second store handle (``side_handle``):
the same answers as one handle, those answers recomputed in Python from the rows written, and
the API's ``/v1/signals`` really running that scan on the second handle."""

from __future__ import annotations

import random
import secrets
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from schemas.analytics import SignalKind, SignalReport
from schemas.usage import Granularity
from worker.analytics import signals
from worker.analytics.api import build_query_app
from worker.analytics.sample import SampleFacts
from worker.analytics.side_handle import SideHandle, sibling
from worker.settings import Settings
from worker.store.rollup import mark_summary_levels, rollup_table
from worker.store.usage import floor_to

pytestmark = [pytest.mark.clickhouse, pytest.mark.no_kafka]
ADMIN = secrets.token_urlsafe(32)
COLUMNS = ["level", "key_id", "bucket", "status", "client_ip", "account_id", "requests"]


@pytest.fixture
def crowd(clickhouse: Client, settings: Settings, sample: SampleFacts) -> list[tuple[str, datetime, str, int]]:
    """On top of the sample: 300 keys seen from 1-40 addresses over the last 30 hours (some rows
    just outside the 24-hour window), written as client_hour rows; returns (key, hour, ip, n)."""
    rnd = random.Random(11)
    now_hour = floor_to(sample.now, Granularity.hour)
    cells: dict[tuple[str, datetime, str], int] = defaultdict(int)
    for k in range(300):
        key = f"cf_liv_crowd{k:011d}"
        addresses = [f"10.{k % 250}.{i // 250}.{i % 250}" for i in range(rnd.choice((1, 2, 5, 19, 20, 21, 40)))]
        for _ in range(rnd.randint(20, 120)):
            hour = now_hour - timedelta(hours=rnd.randint(0, 29))
            cells[(key, hour, rnd.choice(addresses))] += rnd.randint(1, 9)
    rows = [["client_hour", key, hour, 200, ip, f"acct-{key[-2:]}", n] for (key, hour, ip), n in cells.items()]
    # A part of its own per half, as several ingest batches would leave them (unmerged parts).
    table = rollup_table(settings.clickhouse_database)
    clickhouse.insert(table, rows[::2], column_names=COLUMNS)
    clickhouse.insert(table, rows[1::2], column_names=COLUMNS)
    # Written straight into the table: the address counts the worker would have written with them.
    mark_summary_levels(clickhouse, settings.clickhouse_database, int((now_hour - timedelta(days=2)).timestamp()))
    return [(key, hour, ip, n) for (key, hour, ip), n in cells.items()]


def expected_leaks(
    crowd: list[tuple[str, datetime, str, int]], now: datetime, th: signals.SignalThresholds
) -> dict[str, tuple[int, int, str]]:
    """key -> (distinct IPs, requests, busiest 3 IPs) of the crowd keys the leaked-key signal
    must flag, computed from the rows written, without SQL."""
    since = floor_to(now - th.lookback, Granularity.hour)
    per_ip: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, hour, ip, n in crowd:
        if since <= hour < now:
            per_ip[key][ip] += n
    out = {}
    for key, ips in per_ip.items():
        if len(ips) >= th.client_ips_min:
            busiest = sorted(ips.items(), key=lambda item: (-item[1], item[0]))[:3]
            out[key] = (len(ips), sum(ips.values()), ", ".join(f"{ip} ({n:,})" for ip, n in busiest))
    return out


def leaks_of(report: SignalReport) -> dict[str, tuple[int, int, str]]:
    return {
        str(s.key_id): (int(s.evidence["client_ips"]), int(s.evidence["requests"]), str(s.evidence["top_ips"]))
        for s in report.signals
        if s.kind == SignalKind.many_sources and str(s.key_id).startswith("cf_liv_crowd")
    }


def test_side_handle_gives_the_same_report_as_one_handle_and_the_python_count(
    clickhouse: Client, settings: Settings, sample: SampleFacts, crowd: list[tuple[str, datetime, str, int]]
) -> None:
    db = settings.clickhouse_database
    th = signals.SignalThresholds(max_per_kind=1000)
    side = sibling(clickhouse)
    assert side is not None
    assert side is not clickhouse
    alone = signals.abuse_signals(clickhouse, db, sample.now, th)
    beside = signals.abuse_signals(clickhouse, db, sample.now, th, side=side)
    assert beside == alone
    expected = expected_leaks(crowd, sample.now, th)
    assert len(expected) > 50  # the crowd has keys on both sides of the threshold
    assert leaks_of(beside) == expected
    # Every kind of the sample is still found, on either path.
    assert {s.kind for s in beside.signals} == set(SignalKind)


@pytest.mark.parametrize(
    ("threshold", "lookback_hours"),
    [(2, 24), (3, 24), (20, 24), (25, 24), (21, 48), (2, 6)],
    ids=["2-in-24h (scan)", "3-in-24h", "20-in-24h", "25-in-24h", "21-in-48h", "2-in-6h"],
)
def test_leaked_keys_found_from_day_counts_are_the_python_count(
    clickhouse: Client,
    settings: Settings,
    sample: SampleFacts,
    crowd: list[tuple[str, datetime, str, int]],
    threshold: int,
    lookback_hours: int,
) -> None:
    """Candidates from the per-day address counts (or, under 2 a day, the full scan) miss no key."""
    th = signals.SignalThresholds(max_per_kind=1000, client_ips_min=threshold, lookback=timedelta(hours=lookback_hours))
    found = signals.many_sources(clickhouse, settings.clickhouse_database, sample.now, th)
    leaks = {str(s.key_id): int(s.evidence["client_ips"]) for s in found if str(s.key_id).startswith("cf_liv_crowd")}
    expected = expected_leaks(crowd, sample.now, th)
    assert expected  # every case has keys to find
    assert leaks == {key: ips for key, (ips, _, _) in expected.items()}


def test_api_runs_the_leaked_key_scan_on_the_side_handle(
    clickhouse: Client,
    make_settings: Any,
    settings: Settings,
    sample: SampleFacts,
    crowd: list[tuple[str, datetime, str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app_settings = make_settings(admin_api_key=ADMIN, clickhouse_database=settings.clickhouse_database)
    api = TestClient(build_query_app(app_settings, clickhouse, now=lambda: sample.now), headers={"X-API-Key": ADMIN})
    ran_on: list[tuple[Client, str]] = []
    real = signals.many_sources

    def recording(client: Client, *args: Any) -> list[Any]:
        ran_on.append((client, threading.current_thread().name))
        return real(client, *args)

    monkeypatch.setitem(signals.DETECTORS, SignalKind.many_sources, recording)
    th = signals.SignalThresholds()
    direct = signals.abuse_signals(clickhouse, settings.clickhouse_database, sample.now, th)
    ran_on.clear()

    # Two calls at once: each waits for the client and the side handle in turn, none deadlocks.
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda _: api.get("/v1/signals"), range(2)))
    for response in answers:
        assert response.status_code == 200, response.text
        assert SignalReport.model_validate(response.json()) == direct
    assert len(ran_on) == 2
    assert all(client is not clickhouse and name.startswith("signals") for client, name in ran_on)
    found = leaks_of(direct)  # the strongest 50 of the kind: most of the crowd's leaks
    assert len(found) >= th.max_per_kind - 1
    assert found.items() <= expected_leaks(crowd, sample.now, th).items()

    # One kind alone has nothing to run beside: it runs on the main client.
    ran_on.clear()
    only = api.get("/v1/signals", params={"kind": "many_sources"})
    assert only.status_code == 200
    assert [client for client, _ in ran_on] == [clickhouse]


def test_the_side_handle_closes_with_the_app(
    clickhouse: Client, make_settings: Any, settings: Settings, sample: SampleFacts
) -> None:
    app_settings = make_settings(admin_api_key=ADMIN, clickhouse_database=settings.clickhouse_database)
    app = build_query_app(app_settings, clickhouse, now=lambda: sample.now)
    side: SideHandle = app.state.query_context.side
    assert not side.is_open  # opened by the first call that needs it
    with TestClient(app, headers={"X-API-Key": ADMIN}) as api:
        assert api.get("/v1/signals").status_code == 200
        assert side.is_open
    assert not side.is_open
    assert clickhouse.query("SELECT 1").result_rows == [(1,)]  # the main client is not closed with it


def test_side_handle_opens_once_and_lends_to_one_caller_at_a_time(clickhouse: Client, settings: Settings) -> None:
    handle = SideHandle(clickhouse)
    lent: list[Client | None] = []

    def second_caller() -> None:
        with handle.borrow() as again:
            lent.append(again)

    with handle.borrow() as first:
        assert first is not None
        assert first is not clickhouse
        assert first.query("SELECT currentDatabase()").result_rows[0][0] == settings.clickhouse_database
        waiting = threading.Thread(target=second_caller)
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive()
        assert not lent
    waiting.join(5)
    assert lent == [first]  # opened once, then lent again
    handle.close()
