"""The dashboard in a real headless Chromium (DevTools protocol), against a seeded database.

Logs in through the page's own form, checks the charts and lists show the seeded numbers,
drills into the abused key, and keeps screenshots under ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.analytics import Breakdown
from schemas.usage import Granularity
from tests.integration.helpers import REPO_ROOT, free_port
from worker.analytics.queries import series
from worker.analytics.sample import ABUSED_KEY, MANUAL_KEY, NORMAL_KEY, PROBER_KEY, SampleFacts, seed_sample
from worker.settings import Settings
from worker.store.usage import floor_to

pytestmark = [pytest.mark.clickhouse, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO_ROOT / "test-artifacts"
ADMIN = secrets.token_urlsafe(32)  # generated per run: the query API wants >= 32 bytes
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1400,1800",
]

if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
websockets_sync = pytest.importorskip("websockets.sync.client", reason="needs the websockets package (dev extra)")


@pytest.fixture(params=["serve-api", "worker"])
def server(
    request: pytest.FixtureRequest, clickhouse: Any, make_settings: Any, settings: Settings
) -> Iterator[tuple[str, SampleFacts]]:
    """The dashboard as `meter serve-api` serves it, and as a running worker serves it next to
    /metrics (on the embedded store the worker is the one process that can read the data).
    Both in this process (chDB is one engine per process), real clock."""
    facts = seed_sample(clickhouse, settings.clickhouse_database)
    database = settings.clickhouse_database
    served = make_settings(admin_api_key=ADMIN, clickhouse_database=database, http_port=free_port())
    serve = _serve_worker if request.param == "worker" else _serve_query_api
    if request.param == "worker":
        # The worker rebuilds its counters from the seeded rows: with the default limits it would
        # block the abused key itself, adding a decision the seeded history does not have.
        served = served.model_copy(update=dict.fromkeys(("limit_per_minute", "limit_per_hour", "limit_per_day"), 10**9))
    with serve(served, clickhouse) as base:
        yield base, facts


@contextlib.contextmanager
def _serve_query_api(served: Settings, clickhouse: Any) -> Iterator[str]:
    import uvicorn

    from worker.analytics.api import build_query_app

    app = build_query_app(served, clickhouse)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=served.http_port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "query API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{served.http_port}"
    srv.should_exit = True
    thread.join(timeout=10)


@contextlib.contextmanager
def _serve_worker(served: Settings, clickhouse: Any) -> Iterator[str]:
    """A whole worker (real broker, its own topics) in a thread with its own event loop."""
    import asyncio

    from worker.app import WorkerRuntime
    from worker.store.rollup import RollupStore

    started, stop = threading.Event(), threading.Event()

    async def run() -> None:
        runtime = WorkerRuntime(served, store=RollupStore(clickhouse, served.clickhouse_database))
        async with runtime.running():
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(60), "the worker did not start"
    try:
        yield f"http://127.0.0.1:{served.http_port}"
    finally:
        stop.set()
        thread.join(timeout=30)


class Browser:
    """Just enough of the DevTools protocol: navigate, evaluate, wait, screenshot."""

    def __init__(self, ws_url: str) -> None:
        self._ws = websockets_sync.connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=10)
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        # Tolerate a page that is still loading (no body yet) while polling.
        guarded = f"(() => {{ try {{ return Boolean({expression}); }} catch (e) {{ return false; }} }})()"
        while not self.js(guarded):
            if time.monotonic() > deadline:
                state = self.js("document.body.dataset.state + ' ' + document.getElementById('error').textContent")
                raise AssertionError(f"timed out waiting for {expression!r} (page state: {state})")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._ws.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.load(resp) if t["type"] == "page"]
        page = Browser(pages[0]["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        yield page
        page.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _top_bars(facts: SampleFacts, request: datetime) -> list[int]:
    """The top bars of the abused, prober and normal keys that a page asking at ``request`` shows:
    `/v1/top?window=1h` counts the minute buckets from floor(request - 1h), so the seeded minutes
    (50, 6 and 1 requests a minute of these keys) drop out only from two minutes after the seed,
    and in the day's first minute yesterday's 23:00 baseline hour row is one of the buckets."""
    since = floor_to(request - timedelta(hours=1), Granularity.minute)
    seeded = floor_to(facts.now, Granularity.minute)
    minutes = sum(1 for i in range(60) if seeded - timedelta(minutes=i) >= since)
    per_minute = ((ABUSED_KEY, 50), (PROBER_KEY, 6), (NORMAL_KEY, 1))
    return [n * minutes + facts.baseline([key], since, request) for key, n in per_minute]


def test_dashboard_shows_traffic_top_keys_blocks_signals_and_drill_down(
    server: tuple[str, SampleFacts], browser: Browser, clickhouse: Any, settings: Settings
) -> None:
    base, facts = server
    browser.call("Page.navigate", url=f"{base}/dashboard")
    browser.wait_for("document.body.dataset.state === 'login'")
    # A wrong key is refused and the form comes back with the API's message.
    browser.js(
        "document.getElementById('login-key').value = 'wrong'; document.getElementById('login-form').requestSubmit()"
    )
    browser.wait_for("document.getElementById('login-error').textContent.includes('Invalid API key')")
    browser.js(
        f"document.getElementById('login-key').value = {json.dumps(ADMIN)};"
        "document.getElementById('login-form').requestSubmit()"
    )
    browser.wait_for("document.body.dataset.state === 'ready'")
    assert browser.js("location.href") == f"{base}/dashboard"  # the key never goes into the URL

    # Top keys: bars in order, with the seeded last-hour numbers.
    bars = browser.js(
        "[...document.querySelectorAll('#top-chart g.bar')].map(g => [g.dataset.keyId, Number(g.dataset.value)])"
    )
    values = [value for _key, value in bars[:3]]
    loaded = datetime.now(UTC)
    # The page asked in some minute between the seed and now (real clock): any of them.
    first = floor_to(facts.now, Granularity.minute)
    minutes_since = int((loaded - first) / timedelta(minutes=1))
    asked = [max(facts.now, first + timedelta(minutes=k)) for k in range(minutes_since + 1)]
    expected_top = [_top_bars(facts, at) for at in asked]
    assert values in expected_top
    assert bars[0][0] == ABUSED_KEY
    # Traffic chart: the bars drawn add up to what the API counts for the same 24 hours.

    expected = series(
        clickhouse, settings.clickhouse_database, None, "", Granularity.hour, breakdown=Breakdown.status_class
    )
    drawn = browser.js("Number(document.querySelector('#traffic-chart svg').dataset.total)")
    rects = browser.js(
        "[...document.querySelectorAll('#traffic-chart rect')].reduce((a, r) => a + Number(r.dataset.value), 0)"
    )
    assert drawn == rects == sum(g.total_requests for g in expected.groups)
    assert browser.js("document.querySelectorAll('#traffic-chart svg g[data-group]').length") == len(expected.groups)

    # Blocked keys: exactly the seeded blocks in force.
    blocked = browser.js("[...document.querySelectorAll('#blocked-list tbody tr')].map(r => r.dataset.keyId)")
    assert blocked == facts.blocked
    manual_row = browser.js(f"document.querySelector('#blocked-list tr[data-key-id=\"{MANUAL_KEY}\"]').textContent")
    assert "until unblocked" in manual_row
    # Signals: the abused key's rate jump is listed with its explanation.
    kinds = browser.js(
        "[...document.querySelectorAll('#signals-list li')].map(li => [li.dataset.kind, li.dataset.keyId || null])"
    )
    assert ["rate_jump", ABUSED_KEY] in kinds
    assert ["rate_limited", ABUSED_KEY] in kinds
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "dashboard.png")

    # Drill down: click the abused key's bar.
    bar = f"#top-chart g.bar[data-key-id='{ABUSED_KEY}'] rect"
    clicked = datetime.now(UTC)
    browser.js(f"document.querySelector({json.dumps(bar)}).dispatchEvent(new MouseEvent('click'))")
    browser.wait_for("document.body.dataset.keyState === 'ready'")
    assert browser.js("document.querySelector('#key-limits [data-blocked]').dataset.blocked") == "true"
    minute = browser.js("Number(document.querySelector('#key-limits [data-window=minute]').dataset.count)")
    assert minute in (0, 30)  # 30 (not 429) in the seeded current minute, 0 if the minute rolled over meanwhile
    actions = browser.js("[...document.querySelectorAll('#key-decisions tbody tr')].map(r => r.dataset.action)")
    assert actions == ["block", "unblock", "block", "unblock", "block", "unblock", "block"]
    key_total = browser.js("Number(document.querySelector('#key-chart svg').dataset.total)")
    # The last 3 hours (minute buckets, real clock, from the page's click) hold the last hour's
    # traffic and, early in the day, yesterday's last baseline hours.
    windows = {floor_to(at - timedelta(hours=3), Granularity.minute) for at in (clicked, datetime.now(UTC))}
    expected = {facts.last_hour[ABUSED_KEY] + facts.baseline([ABUSED_KEY], since, facts.now) for since in windows}
    assert key_total in expected
    browser.screenshot(ARTIFACTS / "dashboard-key.png")
