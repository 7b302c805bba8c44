"""``meter limits backtest`` while a real ``meter worker`` holds the embedded store: the command
asks the worker's API (said in one line), which compares with the overrides the worker follows
on the limits topic; once the worker has stopped, the command opens the store itself and prints
the same answer."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from schemas.analytics import BacktestResult
from tests.integration import test_embedded_while_metering as embedded
from worker.analytics.sample import ABUSED_KEY

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

# The embedded-store test's fixtures and helper: env (a meter subprocess environment with its own
# chDB directory, listener port and admin key), worker (a meter worker process on it), meter.
ADMIN = embedded.ADMIN
env = embedded.env
worker = embedded.worker
meter = embedded.meter


@pytest.fixture
def seeded(env: dict[str, str]) -> None:
    """The sample in the store and an override of acct-b on the limits topic, before the worker
    starts (the test asks for this fixture before ``worker``; the worker then holds the store)."""
    done = meter(env, "analytics-sample")
    assert done.returncode == 0, done.stderr
    done = meter(
        env, "limits", "set", "--account", "acct-b", "--per-minute", "45", "--per-hour", "unlimited",
        "--per-day", "unlimited", "--note", "backtest test",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_backtest_through_the_worker_and_from_the_store(
    env: dict[str, str], seeded: None, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{env['METER_HTTP_PORT']}"
    until = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"per_minute": 40, "per_hour": None, "per_day": None, "scope": "account", "subject": "acct-b"}

    # The worker serves its API once it has started; its book has the override once it has read the topic.
    deadline = time.monotonic() + 90
    while True:
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
        try:
            answer = httpx.post(f"{url}/v1/limits/backtest", json=body, headers={"X-API-Key": ADMIN}, timeout=10)
            if answer.status_code == 200 and any(
                k["in_force_source"] == "account override acct-b" for k in answer.json()["top"]
            ):
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the worker's API never compared with the override"
        time.sleep(0.5)

    argv = ["limits", "backtest", "--per-minute", "40", "--per-hour", "unlimited", "--per-day", "unlimited"]
    argv += ["--account", "acct-b", "--since", "2h", "--until", until]
    through_worker = meter(env, *argv, "--format", "json")
    assert through_worker.returncode == 0, through_worker.stderr
    assert through_worker.stderr.strip().splitlines() == [
        f"note: the embedded store is held by a running worker (pid {worker.pid}); asking its API at {url}"
    ]
    got = BacktestResult.model_validate_json(through_worker.stdout)
    [abused] = [k for k in got.top if k.key_id == ABUSED_KEY]
    # 50 a minute in each of the last 60 minutes (20 of them refused 429 then): 40/min refuses 10 a
    # minute, acct-b's 45/min 5 (the quiet days before, 20 an hour, add requests, never refusals).
    assert abused.requests >= 3000
    assert abused.observed_refused == 1200
    assert (abused.refused, abused.refused_minute, abused.in_force_refused) == (600, 600, 300)
    assert abused.in_force_source == "account override acct-b"

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    from_store = meter(env, *argv, "--format", "json")
    assert from_store.returncode == 0, from_store.stderr
    clock = {"minute_level_from"}  # moves with the clock between the two runs
    assert json.loads(from_store.stdout) | dict.fromkeys(clock) == json.loads(through_worker.stdout) | dict.fromkeys(
        clock
    )
