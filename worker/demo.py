"""``meter demo``: the whole loop on one machine, live.

A worker (in this process, on the embedded ClickHouse), three demo API nodes (processes
serving HTTP), a load generator that drives some keys over their limits, and a refreshing
table of what every key gets: allowed, refused 401/403, rate limited, blocked until when.
At the end, usage and decisions read back from ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx

from node.decision_cache import DecisionCache
from node.demo_api import demo_keys
from node.keys import derive_key_id
from schemas.usage import Granularity
from worker.analytics.queries import key_points
from worker.app import WorkerRuntime
from worker.dsn import redact_dsn
from worker.settings import Settings
from worker.store.decisions import DecisionStore


@dataclass(frozen=True)
class Profile:
    """How one demo key behaves: steady rate, or bursts at the start of each minute."""

    name: str
    per_second: float
    method: str = "GET"
    path: str = "/v0/payments"
    burst: int = 0  # requests sent in the first seconds of every minute
    note: str = ""


PROFILES = (
    Profile("alice", 4.0, note="steady 240/min: blocked after 100 each minute"),
    Profile("carol", 0.2, burst=130, note="bursts of 130 at each minute start"),
    Profile("bob", 1.0, path="/v0/rates", note="60/min: always under the limit"),
    Profile("dave", 0.5, note="light"),
    Profile("reader", 0.4, method="POST", note="lacks payments:write: 403"),
    Profile("revoked", 0.3, note="inactive key: 401"),
)
INVALID_PER_SECOND = 1.0  # made-up keys: 401 storm


@dataclass
class KeyView:
    profile: Profile
    key_id: str
    statuses: Counter[int] = field(default_factory=Counter)
    last_unblock: str = ""


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"node at {url} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"node at {url} not healthy after {timeout:.0f}s")


@contextlib.asynccontextmanager
async def _nodes(settings: Settings, count: int, base_port: int) -> AsyncIterator[list[str]]:
    procs = []
    urls = [f"http://127.0.0.1:{base_port + i}" for i in range(count)]
    try:
        for i in range(count):
            env = {
                **os.environ,
                "METER_NODE_ID": f"node-{i + 1}",
                "METER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "METER_LOG_LEVEL": "WARNING",
            }
            cmd = [sys.executable, "-m", "worker.cli", "--log-level", "WARNING", "node", "--port", str(base_port + i)]
            procs.append(subprocess.Popen(cmd, env=env))
        await asyncio.gather(*(_wait_healthy(u, p) for u, p in zip(urls, procs, strict=True)))
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


async def _drive(
    client: httpx.AsyncClient, urls: list[str], raw: dict[str, str], views: dict[str, KeyView], stop: float
) -> None:
    rng = random.Random(7)
    turn = 0

    async def call(name: str, key: str, view: KeyView | None, method: str, path: str) -> None:
        nonlocal turn
        url = urls[turn % len(urls)] + path
        turn += 1
        try:
            r = await client.request(
                method, url, headers={"X-API-Key": key}, json={"amount": 1} if method == "POST" else None
            )
        except httpx.HTTPError:
            return
        if view is not None:
            view.statuses[r.status_code] += 1

    async def steady(p: Profile) -> None:
        while time.monotonic() < stop:
            await call(p.name, raw[p.name], views[p.name], p.method, p.path)
            await asyncio.sleep(rng.expovariate(p.per_second))

    async def bursts(p: Profile) -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(60 - time.time() % 60 + 1)
            for _ in range(p.burst):
                if time.monotonic() >= stop:
                    return
                await call(p.name, raw[p.name], views[p.name], p.method, p.path)

    async def invalid() -> None:
        while time.monotonic() < stop:
            await call("invalid", f"cf_fake_{rng.getrandbits(64):016x}", None, "GET", "/v0/payments")
            await asyncio.sleep(rng.expovariate(INVALID_PER_SECOND))

    tasks = [steady(p) for p in PROFILES] + [bursts(p) for p in PROFILES if p.burst] + [invalid()]
    await asyncio.gather(*tasks)


def _render(views: dict[str, KeyView], cache: DecisionCache, runtime: WorkerRuntime, elapsed: float) -> str:
    now = datetime.now(UTC)
    lines = [
        f"usage meter demo — {now:%H:%M:%S} UTC, {elapsed:4.0f}s in; limits 100/min, 1000/h, 5000/day per key",
        "",
        f"{'key':8} {'key id':14} {'sent':>5} {'200':>5} {'401':>4} {'403':>4} {'429':>5}  state on every node",
    ]
    for view in views.values():
        block = cache.check(view.key_id)
        if block is not None:
            left = block.seconds_left(now)
            state = (
                f"BLOCKED {block.window.value} {block.count}/{block.limit}, until {block.until:%H:%M:%S} ({left}s)"
                if block.until
                else "BLOCKED by operator"
            )
        else:
            state = "allowed" + (f"   (unblocked {view.last_unblock})" if view.last_unblock else "")
        s = view.statuses
        sent = sum(s.values())
        lines.append(
            f"{view.profile.name:8} {view.key_id[:13]:14} {sent:5} {s[200] + s[201]:5} {s[401]:4} {s[403]:4} "
            f"{s[429]:5}  {state}"
        )
    stats = runtime.consumer.stats if runtime.consumer else None
    limits = runtime.limits
    if stats is not None and limits is not None:
        lines += [
            "",
            f"worker: {stats.counted} events counted, {stats.duplicates} duplicates, "
            f"{sum(stats.rejected.values())} dead-lettered, {limits.engine.live_keys()} live keys, "
            f"{limits.engine.decisions_published} decisions published",
        ]
    lines += ["", "profiles: " + "; ".join(f"{p.name}: {p.note}" for p in PROFILES)]
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def _dashboard(runtime: WorkerRuntime, settings: Settings, port: int) -> AsyncIterator[str | None]:
    """The query API and dashboard on the worker's own ClickHouse client (chDB: one process)."""
    if not port or not settings.admin_api_key.get_secret_value():
        yield None
        return
    import uvicorn

    from worker.analytics.api import build_query_app

    app = build_query_app(settings, runtime.store.client)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(), name="demo-dashboard")
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/dashboard" if server.started else None
    finally:
        server.should_exit = True
        await task


async def _wait_for_enter() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def startup_line(settings: Settings) -> str:
    """What the demo says once the worker is up (the DSN redacted: it may carry a password)."""
    return f"demo: worker up (Kafka {settings.kafka_bootstrap}, ClickHouse {redact_dsn(settings.clickhouse_dsn)})"


async def run_live_demo(
    settings: Settings, duration: float, nodes: int, base_port: int, dashboard_port: int = 8095
) -> int:
    secret = settings.node_secret.get_secret_value()
    seed = settings.demo_seed.get_secret_value()
    if not secret or not seed:
        print("meter demo: set METER_NODE_SECRET and METER_DEMO_SEED (scripts/demo.sh makes random ones)")
        return 2
    raw = demo_keys(seed)
    views = {p.name: KeyView(p, derive_key_id(raw[p.name], secret.encode())) for p in PROFILES}
    by_key = {v.key_id: v for v in views.values()}

    def on_applied(decision: object, _received: float) -> None:
        view = by_key.get(getattr(decision, "key_id", ""))
        if view is not None and getattr(decision, "action", "") == "unblock":
            view.last_unblock = datetime.now(UTC).strftime("%H:%M:%S")

    runtime = WorkerRuntime(settings)
    tty = sys.stdout.isatty()
    async with runtime.running(), _dashboard(runtime, settings, dashboard_port) as dashboard_url:
        print(startup_line(settings))
        if dashboard_url:
            print(f"demo: dashboard at {dashboard_url} (admin key: the METER_ADMIN_API_KEY printed above)")
        cache = DecisionCache(settings, on_applied=on_applied)
        await cache.start()
        await cache.wait_ready(30)
        async with _nodes(settings, nodes, base_port) as urls:
            print(f"demo: {nodes} API nodes serving at {', '.join(urls)}; load for {duration:.0f}s")
            started = time.monotonic()
            stop = started + duration
            async with httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_connections=50)) as client:
                load = asyncio.create_task(_drive(client, urls, raw, views, stop))
                last_print = 0.0
                while not load.done():
                    await asyncio.sleep(1.0)
                    elapsed = time.monotonic() - started
                    if tty:
                        header = f"dashboard: {dashboard_url}\n" if dashboard_url else ""
                        print("\033[2J\033[H" + header + _render(views, cache, runtime, elapsed), flush=True)
                    elif elapsed - last_print >= 10:
                        last_print = elapsed
                        print(_render(views, cache, runtime, elapsed) + "\n", flush=True)
                await load
            print(_render(views, cache, runtime, time.monotonic() - started))
        await cache.stop()
        await asyncio.sleep(1.0)  # let the last batch land
        _print_readback(runtime, settings, views)
        if dashboard_url and tty and sys.stdin.isatty():
            print(f"\ndemo: the dashboard stays up at {dashboard_url}; press Enter to stop.")
            await _wait_for_enter()
    return 0


def _print_readback(runtime: WorkerRuntime, settings: Settings, views: dict[str, KeyView]) -> None:
    client = runtime.store.client
    now = datetime.now(UTC)
    print("\nread back from ClickHouse: requests per minute (last 3 minutes) and decisions")
    for view in views.values():
        points = key_points(
            client,
            settings.clickhouse_database,
            view.key_id,
            Granularity.minute,
            now - timedelta(minutes=3),
            now + timedelta(seconds=1),
            sparse=True,
        )
        series = "  ".join(f"{p.bucket:%H:%M}={p.requests}" for p in points) or "-"
        print(f"  {view.profile.name:8} {view.key_id}: {series}")
        for d in reversed(DecisionStore(client, settings.clickhouse_database).history(view.key_id, 6)):
            until = f" until {d.until:%H:%M:%S}" if d.until else ""
            print(f"           {d.decided_at:%H:%M:%S} {d.action.value}{until} — {d.reason}")
    print(f"\ntry: .venv/bin/meter usage --key {views['alice'].key_id} --granularity minute")
