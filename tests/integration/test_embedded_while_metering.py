"""The embedded default while it meters: a real ``meter worker`` process holds the chDB store,
and the CLI's read commands answer through the worker's API exactly what they answer from the
store once the worker has stopped. A hung worker (its API not answering) gets the one-line
message with the ways out, not a traceback."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import cli_env, free_port, wait_for
from worker.settings import Settings
from worker.simulate import Traffic, generate, publish

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

ADMIN = secrets.token_urlsafe(32)


def _until_hour_has_left(seconds: float) -> None:
    """The key state counts the current hour: the two reads must see the same one."""
    left = 3600 - time.time() % 3600
    if left < seconds:
        time.sleep(left + 1)


@pytest.fixture
def env(topics: Settings, tmp_path: Path) -> dict[str, str]:
    return cli_env(
        topics,
        # Not the session's chDB directory: this test process holds that one.
        METER_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'clickhouse'}",
        METER_HTTP_PORT=str(free_port()),
        METER_ADMIN_API_KEY=ADMIN,
        METER_BATCH_TIMEOUT_MS="50",
    )


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, stdout=log, stderr=log)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def meter(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def _answers(env: dict[str, str], now: datetime, key: str) -> dict[str, object]:
    since = (now - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    until = (now + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    span = ["--since", since, "--until", until, "--format", "json"]
    reads = {
        "top": ["top", *span],
        "usage": ["usage", "--key", key, "--granularity", "minute", *span],
        "key-usage": ["key-usage", "--key", key, "--breakdown", "endpoint", "--granularity", "minute", *span],
        "key-state": ["key-state", "--key", key, "--format", "json"],
        "signals": ["signals", "--as-of", until, "--format", "json"],
    }
    out: dict[str, object] = {}
    for name, argv in reads.items():
        done = meter(env, *argv)
        assert done.returncode == 0, f"meter {name}: {done.stderr}"
        out[name] = json.loads(done.stdout)
    state = out["key-state"]
    assert isinstance(state, dict)
    # When it was asked, and so which minute is current; everything else must match.
    state.pop("as_of")
    for window in state["windows"]:
        if window["window"] == "minute":
            window.pop("start")
            window.pop("end")
    return out


def test_read_commands_answer_the_same_while_the_worker_holds_the_store_and_after(
    topics: Settings, env: dict[str, str], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    _until_hour_has_left(180)
    now = datetime.now(UTC)
    events = list(generate(600, Traffic(keys=5, spread=timedelta(minutes=40), seed=13), end=now - timedelta(minutes=1)))
    key = events[0]["key_id"]
    url = f"http://127.0.0.1:{env['METER_HTTP_PORT']}"

    async def published() -> None:
        await publish(topics.kafka_bootstrap, topics.events_topic, events)

    import asyncio

    asyncio.run(published())

    def counted() -> bool:
        try:
            top = httpx.get(f"{url}/v1/top", params={"window": "2h", "n": 50}, headers={"X-API-Key": ADMIN})
        except httpx.HTTPError:
            return False
        return top.status_code == 200 and sum(e["requests"] for e in top.json()["entries"]) == len(events)

    asyncio.run(wait_for(counted, 90, "the worker to count every event"))
    announced = json.loads((tmp_path / "clickhouse.worker.json").read_text())
    assert announced == {"pid": worker.pid, "url": url, "api": True}

    # While the worker runs: every read goes through its API, and says so in one line.
    done = meter(env, "top", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"note: the embedded store is held by a running worker (pid {worker.pid}); asking its API at {url}"
    ]
    while_running = _answers(env, now, key)

    # A hung worker: its API does not answer, so the read says what to do, in one line.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        hung = meter(env, "top")
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert hung.returncode == 2
    [line] = hung.stderr.strip().splitlines()
    assert line.startswith("meter top: the embedded store is held by a running worker")
    assert "--api URL" in line
    assert "METER_CLICKHOUSE_DSN=http://" in line

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    assert not (tmp_path / "clickhouse.worker.json").exists()

    # After it stopped: the same commands open the store themselves, and answer the same.
    after = _answers(env, now, key)
    assert after == while_running
    usage = after["usage"]
    assert isinstance(usage, list)
    assert sum(p["requests"] for p in usage) == sum(1 for e in events if e["key_id"] == key)
