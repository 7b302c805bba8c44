"""Decisions benchmark: block propagation delay and cluster-wide overshoot, 3 nodes at 5,000 events/s.

    .venv/bin/python -m bench.decisions [--rate 5000] [--duration 80] [--batch-timeout-ms 200]

Set-up, all on loopback:

* the metering worker runs as its own process (its own core): ``python -m bench.decisions
  --worker-child``, which is ``meter worker`` (same settings, logging, ``WorkerRuntime``,
  ``app.run()``) plus phase timers (a few ``perf_counter`` calls per batch, per fast-lane fetch
  and per publish, printed as ``BENCHSTAT`` lines on stderr; ``--loop-probe`` adds an event-loop
  lateness probe to it and to this process, at ~10% of a core each); ``--plain-worker`` runs
  ``python -m worker.cli worker`` itself instead. Unique topics, its own consumer group, a fresh chDB directory;
* this process holds three simulated API nodes, each a ``UsageReporter`` (the batched
  idempotent producer, default linger 5 ms) and a ``DecisionCache`` (following the compacted
  decisions topic, default ``fetch_max_wait_ms``) whose ``on_applied`` hook records the
  monotonic time at which each block became visible on that node;
* a paced load loop (token bucket, asyncio) hands ``--rate`` events/s round-robin to the
  nodes. Each request is admitted only if that node's ``DecisionCache.check(key)`` is None,
  as the middleware does, and reported either way (admitted: status 200; refused: 429, which
  the worker does not count toward limits); events are built with ``make_event`` at ts = now
  (UTC), as the middleware builds them;
* background traffic: ``--keys`` keys chosen uniformly, each far under its limits;
* hot keys: a new one every ``--hot-every`` s sends ``--hot-requests`` requests at
  ``--hot-rate`` requests/s, so it crosses 100/min at a known moment. Hot keys start only
  where their whole burst (plus a margin) fits inside the current UTC minute, so every
  burst is counted in one minute window.

Measured per crossing (one per hot key):

* delay = (the moment the last of the three nodes applied the block) − (the moment the 100th
  admitted request of that key was handed to its node's reporter, i.e. ``report()``
  returned). It therefore includes the reporter's linger and ack wait, the broker, the
  worker's fetch, batch and evaluation, the decision's publish, and each node's fetch;
* overshoot = requests admitted across the three nodes − the limit (100).

Also: the achieved event rate, the worker's consumer lag (committed offsets vs end offsets,
sampled each second), CPU of both processes, and a breakdown of the delay: event handoff →
``decided_at`` (stamped by the worker when it evaluates the batch) → visible on all nodes,
plus the worker's per-batch phases. Figures go to ``bench/results.md`` ("## Decisions",
machine-written block) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from bench.common import BENCH_DIR, cpu_seconds, machine, now_utc, replace_block, run_topics, system_cpu, versions
from common import kafka_clients
from common.retry import cancel_and_wait
from node.decision_cache import FETCH_MAX_WAIT_MS, DecisionCache
from node.reporter import UsageReporter
from node.settings import NodeSettings
from schemas.decisions import Decision, DecisionAction
from schemas.events import make_event
from worker.settings import Settings
from worker.topics import ensure_topics

log = logging.getLogger("bench.decisions")
REPO_ROOT = BENCH_DIR.parent

LIMIT = 100  # the default per-minute limit the hot keys cross
NODES = 3
STAT_PREFIX = "BENCHSTAT "
READY_LINE = "limit counters rebuilt"


# -- worker child process (instrumented `meter worker`) ------------------------------------


def worker_child(loop_probe: bool) -> int:
    """``meter worker`` with phase timers: one ``BENCHSTAT`` JSON line on stderr per batch handled
    (records, wall span, age of its records) and per timed call (dedup lookup, publishing
    decisions and allowances, ClickHouse write, offset commit), and once a second for the fast
    lane's fetches (and the loop probe's samples, with ``--loop-probe``). Calls are timed on
    their own, not attributed to a batch, so the figures stay right when the worker overlaps a
    write with the next batch."""
    from worker.app import WorkerRuntime
    from worker.ingest.consumer import PartitionWriter
    from worker.logs import setup_logging
    from worker.store.rollup import RollupStore

    settings = Settings()
    setup_logging(settings.log_level, settings.log_json)
    last_end = [0.0]

    import threading

    emit_lock = threading.Lock()  # store calls run in threads: one whole line at a time

    def emit(stat: dict[str, Any]) -> None:
        line = STAT_PREFIX + json.dumps(stat) + "\n"
        with emit_lock:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except BrokenPipeError:  # the bench is gone (killed): a worker left running would skew the next run
                os._exit(1)

    def timed_sync(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                emit({"t": time.time(), "phase": name, "dt": time.perf_counter() - t0})

        return wrapper

    def timed_async(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                emit({"t": time.time(), "phase": name, "dt": time.perf_counter() - t0})

        return wrapper

    def patch(owner: Any, attr: str, make: Callable[[str, Any], Any], name: str) -> None:
        original = getattr(owner, attr, None)
        if original is not None:  # the worker's code moves on: time what exists
            setattr(owner, attr, make(name, original))

    orig_handle = PartitionWriter.handle

    async def handle(self: PartitionWriter, records: Sequence[Any]) -> Any:
        t0 = time.perf_counter()
        wall = time.time()
        ages = [wall - r.timestamp / 1000.0 for r in records] if records else [0.0]
        try:
            return await orig_handle(self, records)
        finally:
            t1 = time.perf_counter()
            emit(
                {
                    "t": wall,
                    "phase": "batch",
                    "n": len(records),
                    "gap": t0 - last_end[0] if last_end[0] else 0.0,
                    "dt": t1 - t0,
                    "age_min": min(ages),
                    "age_max": max(ages),
                }
            )
            last_end[0] = t1

    PartitionWriter.handle = handle  # type: ignore[method-assign]

    time_fast_lane(emit)
    patch(PartitionWriter, "_commit", timed_async, "commit")
    patch(RollupStore, "seen_hashes", timed_sync, "dedup")
    patch(RollupStore, "write", timed_sync, "write")
    time_publishing(emit)

    async def run_worker() -> None:
        # Opt-in: the probe wakes the loop ~900 times a second (~10% of a core on this machine).
        probe = asyncio.create_task(probe_loop(emitted_each_second(emit, "loop"))) if loop_probe else None
        try:
            await runtime.app.run()
        finally:
            if probe is not None:
                probe.cancel()

    runtime = WorkerRuntime(settings)
    asyncio.run(run_worker())
    return 0


Emit = Callable[[dict[str, Any]], None]


def time_publishing(emit: Emit) -> None:
    """``KeyedPublisher._deliver``: one decision or allowance record, from the start of its
    send (in the background, after the earlier records of its key) until acked."""
    from worker.limits.publisher import KeyedPublisher

    original = KeyedPublisher._deliver
    record = emitted_each_second(emit, "publish_values")

    async def deliver(self: KeyedPublisher, topic: str, key: str, value: bytes) -> None:
        t0 = time.perf_counter()
        try:
            await original(self, topic, key, value)
        finally:
            record(time.perf_counter() - t0)

    KeyedPublisher._deliver = deliver  # type: ignore[method-assign]


def time_fast_lane(emit: Emit) -> None:
    """The fast lane, per fetch: records, age of the newest and oldest (their CreateTime, set by
    the node's producer) when it starts grouping them, and grouping + counting + publishing (with its wait for the acks)
    time; emitted once a second (``emitted_each_second``)."""
    from worker.limits import fastlane
    from worker.limits.service import LimitService

    orig_group = fastlane.group_batch
    orig_on_fast = LimitService._on_fast_batch
    record = emitted_each_second(emit, "fast")
    started: list[float] = []  # the fetch being handled: records, ages, perf_counter at its start

    def group_batch(records: Sequence[Any], *args: Any) -> Any:
        wall = time.time()
        stamps = [r.timestamp for r in records]
        started[:] = [len(records), wall - max(stamps) / 1000.0, wall - min(stamps) / 1000.0, time.perf_counter()]
        return orig_group(records, *args)

    async def on_fast_batch(self: LimitService, batch: Any) -> None:
        try:
            await orig_on_fast(self, batch)
        finally:
            if started:
                record([*started[:3], time.perf_counter() - started[3]])
                started.clear()

    fastlane.group_batch = group_batch  # type: ignore[assignment]
    LimitService._on_fast_batch = on_fast_batch  # type: ignore[method-assign]


async def probe_loop(record: Callable[[float], None]) -> None:
    """Sleep 1 ms over and over and ``record`` how late each sleep ends: how long the other
    tasks of this event loop hold it at a time (in the worker, the fast lane cannot take its
    next fetch meanwhile; in the bench, a node cannot see a decision)."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        record(time.perf_counter() - t0 - 0.001)


def emitted_each_second(emit: Emit, phase: str) -> Callable[[Any], None]:
    """Collect values; emit them in one ``phase`` line a second (a line each would cost more)."""
    values: list[Any] = []
    flushed = [time.time()]

    def record(value: Any) -> None:
        values.append(value)
        if (now := time.time()) - flushed[0] >= 1.0:
            emit({"t": now, "phase": phase, "values": values[:]})
            values.clear()
            flushed[0] = now

    return record


def code_version() -> str:
    """HEAD and, if the worker/node/schemas tree differs from it, a digest of the difference."""
    import hashlib
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "worker", "node", "schemas"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not diff:
        return f"commit {head}"
    digest = hashlib.sha1(diff).hexdigest()[:10]
    return f"commit {head} + uncommitted changes to worker/node/schemas (diff sha1 {digest})"


# -- bookkeeping ---------------------------------------------------------------------------


@dataclass(slots=True)
class HotKey:
    key_id: str
    started: float  # monotonic
    sent: int = 0
    admitted: int = 0
    refused: int = 0
    cross_mono: float | None = None
    cross_wall: float | None = None
    applied: dict[str, float] = field(default_factory=dict)  # node -> monotonic
    decided_at: float | None = None  # wall, stamped by the worker
    decision_count: int | None = None

    def delay(self) -> float | None:
        if self.cross_mono is None or len(self.applied) < NODES:
            return None
        return max(self.applied.values()) - self.cross_mono


@dataclass(slots=True)
class SimNode:
    name: str
    reporter: UsageReporter
    cache: DecisionCache
    handed: int = 0
    admitted: int = 0
    refused: int = 0


@dataclass
class LagSample:
    t: float
    lag: int


@dataclass
class Run:
    hot: dict[str, HotKey] = field(default_factory=dict)
    unexpected_blocks: int = 0
    events: int = 0
    measure_events: int = 0
    measure_seconds: float = 0.0
    lag: list[LagSample] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    worker_log: list[str] = field(default_factory=list)
    windows_skipped: int = 0
    loop_late_max: float = 0.0
    bench_late: list[float] = field(default_factory=list)  # the bench's own loop, while measuring


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
    return s[k]


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


# -- worker process management -------------------------------------------------------------


async def start_worker(
    env: dict[str, str], plain: bool, run: Run, loop_probe: bool = False
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    args = ["-m", "worker.cli", "worker"] if plain else ["-m", "bench.decisions", "--worker-child"]
    if loop_probe and not plain:
        args.append("--loop-probe")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=str(REPO_ROOT),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    ready = asyncio.Event()

    async def pump() -> None:
        assert proc.stderr is not None
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(STAT_PREFIX):
                # Keep reading whatever happens: a stopped reader would fill the pipe and stall the worker.
                with contextlib.suppress(ValueError):
                    run.stats.append(json.loads(line[len(STAT_PREFIX) :]))
                continue
            run.worker_log.append(line)
            if READY_LINE in line:
                ready.set()

    task = asyncio.create_task(pump(), name="worker-stderr")
    try:
        await asyncio.wait_for(ready.wait(), 90)
    except TimeoutError:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 5)
        tail = "\n".join(run.worker_log[-30:])
        raise RuntimeError(f"worker did not become ready in 90 s; its log:\n{tail}") from None
    return proc, task


async def stop_worker(proc: asyncio.subprocess.Process, pump: asyncio.Task[None]) -> int:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(pump, 5)
    return proc.returncode if proc.returncode is not None else -1


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- consumer lag --------------------------------------------------------------------------


class LagProbe:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = kafka_clients.admin(settings, request_timeout_ms=10_000)
        self.consumer = kafka_clients.consumer(settings, enable_auto_commit=False)
        self.tps = [TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)]

    async def __aenter__(self) -> LagProbe:
        await self.admin.start()
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def lag(self) -> int:
        end = await self.consumer.end_offsets(self.tps)
        committed = await self.admin.list_consumer_group_offsets(self.settings.consumer_group, partitions=self.tps)
        total = 0
        for tp in self.tps:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            total += max(0, end[tp] - done)
        return total

    async def sample_until(self, stop: asyncio.Event, run: Run, t0: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                run.lag.append(LagSample(time.monotonic() - t0, await self.lag()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


# -- load ----------------------------------------------------------------------------------


class Load:
    """Paced, round-robin request generator with per-node admission like the middleware's."""

    def __init__(self, nodes: list[SimNode], run: Run, args: argparse.Namespace, tag: str) -> None:
        self.nodes = nodes
        self.run = run
        self.args = args
        self.rng = random.Random(args.seed)
        self.bg_keys = [f"bg_{tag}_{i:05d}" for i in range(args.keys)]
        self.bg_accounts = [f"acct-{i % 500:03d}" for i in range(args.keys)]
        self.tag = tag
        self.rr = 0
        self.hot_seq = 0
        self.burst_s = args.hot_requests / args.hot_rate

    def emit(self, key_id: str, account: str, hot: HotKey | None) -> None:
        node = self.nodes[self.rr % NODES]
        self.rr += 1
        blocked = node.cache.check(key_id) is not None
        event = make_event(
            request_id=uuid.uuid4().hex,
            key_id=key_id,
            node_id=node.name,
            method="GET",
            endpoint="/v0/payments",
            status=429 if blocked else 200,
            ts=datetime.now(UTC),
            account_id=account,
            latency_ms=0.5,
        )
        node.reporter.report(event)
        node.handed += 1
        self.run.events += 1
        if blocked:
            node.refused += 1
        else:
            node.admitted += 1
        if hot is not None:
            hot.sent += 1
            if blocked:
                hot.refused += 1
            else:
                hot.admitted += 1
                if hot.admitted == LIMIT:
                    hot.cross_mono = time.monotonic()
                    hot.cross_wall = time.time()

    def window_ok(self) -> bool:
        """The whole burst (plus margin) fits in the current UTC minute."""
        second = time.time() % 60.0
        return second >= 1.0 and second + self.burst_s + self.args.window_margin <= 60.0

    async def drive(self, seconds: float, with_hot: bool) -> tuple[int, float]:
        """Emit for ``seconds`` (then finish the hot bursts in progress); returns the events
        emitted and the seconds elapsed in the paced phase (the tail of bursts is not counted)."""
        rate = self.args.rate
        tick = self.args.tick_ms / 1000.0
        start = time.monotonic()
        emitted_at_start = self.run.events
        due: list[tuple[float, int, HotKey]] = []  # (time, seq, key)
        next_hot = start
        interval = 1.0 / self.args.hot_rate
        emitted = 0
        while True:
            now = time.monotonic()
            elapsed = now - start
            if elapsed >= seconds:
                break
            if with_hot:
                while next_hot <= now:
                    if self.window_ok():
                        self.hot_seq += 1
                        hot = HotKey(f"hot_{self.tag}_{self.hot_seq:05d}", now)
                        self.run.hot[hot.key_id] = hot
                        heapq.heappush(due, (now, self.hot_seq, hot))
                    else:
                        self.run.windows_skipped += 1
                    next_hot += self.args.hot_every
            target = int(rate * elapsed)
            while due and due[0][0] <= now:
                at, seq, hot = heapq.heappop(due)
                self.emit(hot.key_id, "acct-hot", hot)
                emitted += 1
                if hot.sent < self.args.hot_requests:
                    heapq.heappush(due, (at + interval, seq, hot))
            n_bg = target - emitted
            for _ in range(max(0, n_bg)):
                i = self.rng.randrange(len(self.bg_keys))
                self.emit(self.bg_keys[i], self.bg_accounts[i], None)
            emitted += max(0, n_bg)
            slept_from = time.monotonic()
            await asyncio.sleep(tick)
            self.run.loop_late_max = max(self.run.loop_late_max, time.monotonic() - slept_from - tick)
        paced = (self.run.events - emitted_at_start, time.monotonic() - start)
        # Let bursts in progress finish (they are part of the crossings), still at pace.
        while due:
            now = time.monotonic()
            while due and due[0][0] <= now:
                at, seq, hot = heapq.heappop(due)
                self.emit(hot.key_id, "acct-hot", hot)
                if hot.sent < self.args.hot_requests:
                    heapq.heappush(due, (at + interval, seq, hot))
            await asyncio.sleep(tick)
        return paced


# -- the run -------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-decisions-"))
    topics = run_topics(f"bench.dec.{tag}")
    settings = Settings(
        kafka_bootstrap=args.bootstrap,
        consumer_group=f"bench-dec-{tag}",
        clickhouse_dsn=f"chdb://{data_dir / 'ch'}",
        batch_timeout_ms=args.batch_timeout_ms,
        limit_per_minute=LIMIT,
    ).model_copy(update=topics)
    await ensure_topics(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env.update(
        {
            "METER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            **{f"METER_{name.upper()}": topic for name, topic in topics.items()},
            "METER_CONSUMER_GROUP": settings.consumer_group,
            "METER_CLICKHOUSE_DSN": settings.clickhouse_dsn,
            "METER_BATCH_TIMEOUT_MS": str(args.batch_timeout_ms),
            "METER_LIMIT_PER_MINUTE": str(LIMIT),
            "METER_LOG_LEVEL": "INFO",
        }
    )
    env.update(dict(kv.split("=", 1) for kv in args.worker_env))
    run = Run()
    print(f"bench.decisions: run {tag}, worker env overrides {args.worker_env or '-'}; starting worker ...", flush=True)
    proc, pump = await start_worker(env, args.plain_worker, run, args.loop_probe)
    nodes: list[SimNode] = []
    result: dict[str, Any] = {}
    try:

        def hook(name: str) -> Callable[[Decision, float], None]:
            def on_applied(decision: Decision, received: float) -> None:
                if decision.action is not DecisionAction.block:
                    return
                hot = run.hot.get(decision.key_id)
                if hot is None:
                    run.unexpected_blocks += 1
                    return
                hot.applied.setdefault(name, received)
                hot.decided_at = decision.decided_at.timestamp()
                hot.decision_count = decision.count

            return on_applied

        for i in range(NODES):
            name = f"node-{i + 1}"
            ns = settings.model_copy(update={"node_id": name})
            node = SimNode(
                name,
                UsageReporter(ns, linger_ms=args.linger_ms),
                DecisionCache(ns, on_applied=hook(name), fetch_max_wait_ms=args.node_fetch_max_wait_ms),
            )
            await node.reporter.start()
            await node.cache.start()
            nodes.append(node)
        for node in nodes:
            if not await node.cache.wait_ready(30):
                raise RuntimeError(f"{node.name}: decision cache not ready in 30 s")
        load = Load(nodes, run, args, tag)
        async with LagProbe(settings) as probe:
            stop_lag = asyncio.Event()
            t0 = time.monotonic()
            lag_task = asyncio.create_task(probe.sample_until(stop_lag, run, t0))
            print(f"warm-up {args.warmup:.0f} s at {args.rate} events/s ...", flush=True)
            await load.drive(args.warmup, with_hot=False)
            cpu0 = (time.process_time(), cpu_seconds(proc.pid), time.monotonic())
            sys0 = system_cpu()
            measure_from = time.monotonic() - t0
            stat_from = time.time()
            print(f"measuring {args.duration:.0f} s ...", flush=True)
            bench_probe = asyncio.create_task(probe_loop(run.bench_late.append)) if args.loop_probe else None
            n, secs = await load.drive(args.duration, with_hot=True)
            await cancel_and_wait(bench_probe)
            run.measure_events, run.measure_seconds = n, secs
            cpu1 = (time.process_time(), cpu_seconds(proc.pid), time.monotonic())
            sys1 = system_cpu()
            stat_to = time.time()
            measure_to = time.monotonic() - t0
            print("load done; waiting for late blocks and the worker's backlog ...", flush=True)
            # Grace: late blocks, and the worker draining what is left.
            deadline = time.monotonic() + args.grace
            while time.monotonic() < deadline:
                if all(h.delay() is not None for h in run.hot.values() if h.cross_mono is not None):
                    break
                await asyncio.sleep(0.1)
            drain_deadline = time.monotonic() + 30
            final_lag = await probe.lag()
            while final_lag > 0 and time.monotonic() < drain_deadline:
                await asyncio.sleep(0.5)
                final_lag = await probe.lag()
            stop_lag.set()
            await lag_task
        result = summarise(run, nodes, args, settings, measure_from, measure_to, stat_from, stat_to, cpu0, cpu1)
        result["final_lag"] = final_lag
        busy, total = sys1[0] - sys0[0], sys1[1] - sys0[1]
        result["cpu_machine"] = busy / total if total else 0.0
        result["loadavg"] = loadavg()
    finally:
        print("stopping nodes and worker ...", flush=True)
        for node in nodes:
            await node.reporter.stop()
            await node.cache.stop()
        rc = await stop_worker(proc, pump)
        if rc not in (0, -15):
            print(f"worker exited with {rc}; last log lines:\n" + "\n".join(run.worker_log[-20:]), file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)
        await delete_topics(settings, list(topics.values()))
    result["worker_rc"] = rc
    return result


async def delete_topics(settings: Settings, names: list[str]) -> None:
    admin = kafka_clients.admin(settings, request_timeout_ms=10_000)
    with contextlib.suppress(Exception):
        await admin.start()
        await admin.delete_topics(names)
    with contextlib.suppress(Exception):
        await admin.close()


def summarise(
    run: Run,
    nodes: list[SimNode],
    args: argparse.Namespace,
    settings: Settings,
    measure_from: float,
    measure_to: float,
    stat_from: float,
    stat_to: float,
    cpu0: tuple[float, float, float],
    cpu1: tuple[float, float, float],
) -> dict[str, Any]:
    crossed = [h for h in run.hot.values() if h.cross_mono is not None]
    delays = [d for h in crossed if (d := h.delay()) is not None]
    missing = [h.key_id for h in crossed if h.delay() is None]
    overshoot = [h.admitted - LIMIT for h in crossed]
    to_decided = [h.decided_at - h.cross_wall for h in crossed if h.decided_at is not None and h.cross_wall is not None]
    # decided_at (worker wall clock) -> visible on all nodes: convert node monotonic times to wall
    mono_to_wall = time.time() - time.monotonic()
    to_visible = [
        max(h.applied.values()) + mono_to_wall - h.decided_at
        for h in crossed
        if h.decided_at is not None and len(h.applied) == NODES
    ]
    first_node = [
        min(h.applied.values()) - h.cross_mono for h in crossed if h.cross_mono is not None and len(h.applied) == NODES
    ]
    spread = [max(h.applied.values()) - min(h.applied.values()) for h in crossed if len(h.applied) == NODES]
    lag_in = [s.lag for s in run.lag if measure_from <= s.t <= measure_to]
    stats = [s for s in run.stats if stat_from <= s["t"] <= stat_to]
    wall = cpu1[2] - cpu0[2]

    def dist(values: Sequence[float]) -> dict[str, float]:
        if not values:
            return {}
        return {
            "n": len(values),
            "mean": statistics.fmean(values),
            "p50": pct(values, 50),
            "p90": pct(values, 90),
            "p99": pct(values, 99),
            "max": max(values),
        }

    histogram: dict[int, int] = {}
    for o in overshoot:
        histogram[o] = histogram.get(o, 0) + 1
    phases: dict[str, Any] = {}
    batches = [x for x in stats if x.get("phase") == "batch"]
    if batches:
        span = batches[-1]["t"] - batches[0]["t"]
        phases = {
            "batches": len(batches),
            "batches_per_s": len(batches) / span if span > 0 else float("nan"),
            "records": dist([x["n"] for x in batches]),
            "cycle": dist([x["dt"] + x["gap"] for x in batches]),
            "gap": dist([x["gap"] for x in batches]),
            "handle": dist([x["dt"] for x in batches]),
            "age_newest": dist([x["age_min"] for x in batches]),
            "age_oldest": dist([x["age_max"] for x in batches]),
        }
        for name in ("dedup", "publish", "write", "commit"):
            phases[name] = dist([x["dt"] for x in stats if x.get("phase") == name])
        published = [v for x in stats if x.get("phase") == "publish_values" for v in x["values"]]
        if published:
            phases["publish"] = dist(published)
            span = stats[-1]["t"] - stats[0]["t"]
            phases["published_per_s"] = len(published) / span if span > 0 else float("nan")
        late = [v for x in stats if x.get("phase") == "loop" for v in x["values"]]
        if late:
            phases["loop_late"] = dist(late)
        fast = [row for x in stats if x.get("phase") == "fast" for row in x["values"]]
        if fast:
            span = stats[-1]["t"] - stats[0]["t"]
            phases["fast_fetches_per_s"] = len(fast) / span if span > 0 else float("nan")
            phases["fast_records"] = dist([r[0] for r in fast])
            phases["fast_age_newest"] = dist([r[1] for r in fast])
            phases["fast_age_oldest"] = dist([r[2] for r in fast])
            phases["fast_handle"] = dist([r[3] for r in fast])
    return {
        "args": vars(args),
        "crossings": len(crossed),
        "hot_keys": len(run.hot),
        "hot_not_crossed": len(run.hot) - len(crossed),
        "missing": missing,
        "delay": dist(delays),
        "delay_first_node": dist(first_node),
        "node_spread": dist(spread),
        "to_decided": dist(to_decided),
        "decided_to_visible": dist(to_visible),
        "overshoot": dist([float(o) for o in overshoot]),
        "overshoot_total": sum(overshoot),
        "overshoot_hist": dict(sorted(histogram.items())),
        "admitted_per_crossing_max": max((h.admitted for h in crossed), default=0),
        "decision_count": dist([float(h.decision_count) for h in crossed if h.decision_count is not None]),
        "unexpected_blocks": run.unexpected_blocks,
        "rate": run.measure_events / run.measure_seconds if run.measure_seconds else 0.0,
        "events_measured": run.measure_events,
        "seconds_measured": run.measure_seconds,
        "events_total": run.events,
        "loop_late_max": run.loop_late_max,
        "bench_late": dist(run.bench_late),
        "windows_skipped": run.windows_skipped,
        "reporters": {
            n.name: {"handed": n.handed, "admitted": n.admitted, "refused": n.refused, **vars_state(n)} for n in nodes
        },
        "lag": dist([float(x) for x in lag_in]),
        "lag_samples": len(lag_in),
        "cpu_bench": (cpu1[0] - cpu0[0]) / wall if wall else 0.0,
        "cpu_worker": (cpu1[1] - cpu0[1]) / wall if wall else 0.0,
        "phases": phases,
        "code": code_version(),
    }


def vars_state(node: SimNode) -> dict[str, Any]:
    st = node.reporter.state()
    return {"sent": st.sent, "dropped": st.dropped, "buffered": st.buffered}


# -- report --------------------------------------------------------------------------------


def fmt_dist(d: dict[str, float], unit: str = "ms") -> str:
    if not d:
        return "n/a"

    def f(x: float) -> str:
        return ms(x) if unit == "ms" else f"{x:.1f}"

    return (
        f"p50 {f(d['p50'])}  p90 {f(d['p90'])}  p99 {f(d['p99'])}  max {f(d['max'])}  "
        f"(mean {f(d['mean'])}, n={d['n']:.0f}) {unit}"
    )


def render(r: dict[str, Any], for_file: bool) -> str:
    a = r["args"]
    m = machine()
    v = versions("aiokafka", "faststream", "chdb", "clickhouse-connect", "pydantic")
    d = r["delay"]
    ncpu = os.cpu_count() or 1
    target_ok = meets_target(d)
    lines: list[str] = []
    add = lines.append
    if for_file:
        add(f"Run {now_utc()} with `.venv/bin/python -m bench.decisions {cli_of(a)}`.")
        add("")
        add(
            f"Machine: {m['nproc']} CPUs ({m['usable cpus']} usable), {m['cpu']}, {m['ram']} RAM, "
            f"{m['os']}, Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + ". "
            f"Code measured: {r['code']}."
        )
        add("")
    add(
        f"Load: {a['rate']} events/s requested, **{r['rate']:.0f} events/s achieved** "
        f"({r['events_measured']} events in {r['seconds_measured']:.1f} s measured, after {a['warmup']:.0f} s "
        f"warm-up), round-robin over 3 nodes; {a['keys']} background keys; a hot key every {a['hot_every']} s, "
        f"each {a['hot_requests']} requests at {a['hot_rate']:.0f}/s. Worker: separate process, "
        f"METER_BATCH_TIMEOUT_MS={a['batch_timeout_ms']}"
        + (f", {' '.join(a['worker_env'])}" if a["worker_env"] else "")
        + f"; reporter linger {a['linger_ms']} ms; node fetch_max_wait_ms {a['node_fetch_max_wait_ms']}."
    )
    add("")
    if for_file:
        add("| measure | p50 | p90 | p99 | max | mean | n |")
        add("| --- | --- | --- | --- | --- | --- | --- |")
        for label, key in (
            ("**propagation delay** (crossing event handed to reporter → block visible on all 3 nodes)", "delay"),
            ("… to the first node", "delay_first_node"),
            ("… handoff → worker decided (`decided_at`)", "to_decided"),
            ("… decided → visible on all 3 nodes", "decided_to_visible"),
            ("… spread between first and last node", "node_spread"),
        ):
            dd = r[key]
            if dd:
                add(
                    f"| {label} | {ms(dd['p50'])} ms | {ms(dd['p90'])} ms | {ms(dd['p99'])} ms | "
                    f"{ms(dd['max'])} ms | {ms(dd['mean'])} ms | {dd['n']:.0f} |"
                )
        o = r["overshoot"]
        if o:
            add(
                f"| **overshoot** (admitted − 100, per crossing) | {o['p50']:.0f} | {o['p90']:.0f} | {o['p99']:.0f} | "
                f"{o['max']:.0f} | {o['mean']:.2f} | {o['n']:.0f} |"
            )
        add("")
    else:
        add(f"propagation delay      {fmt_dist(r['delay'])}")
        add(f"  to first node        {fmt_dist(r['delay_first_node'])}")
        add(f"  handoff -> decided   {fmt_dist(r['to_decided'])}")
        add(f"  decided -> all nodes {fmt_dist(r['decided_to_visible'])}")
        add(f"  node spread          {fmt_dist(r['node_spread'])}")
        add(f"overshoot              {fmt_dist(r['overshoot'], unit='requests')}")
    add(
        f"Target p50 ≤ 15 ms and p99 ≤ 50 ms: **{'met' if target_ok else 'NOT met'}**"
        + (f" (p50 {ms(d['p50'])} ms, p99 {ms(d['p99'])} ms)." if d else ".")
        + f" Crossings: {r['crossings']} of {r['hot_keys']} hot keys, all seen on all 3 nodes"
        + (f" except {len(r['missing'])}" if r["missing"] else "")
        + f"; blocks of background keys: {r['unexpected_blocks']}."
    )
    add(
        f"Overshoot: total {r['overshoot_total']} requests admitted past the limit over {r['crossings']} crossings; "
        "histogram (overshoot: crossings) "
        + ", ".join(f"{k}: {n}" for k, n in r["overshoot_hist"].items())
        + f" (capped at {a['hot_requests'] - LIMIT}: a hot key sends {a['hot_requests']} requests)"
        + f". Count carried by the block decision: {fmt_dist(r['decision_count'], unit='requests')}."
    )
    lg = r["lag"]
    add(
        "Worker consumer lag (end offsets − committed, sampled each second while measuring): "
        + (f"p50 {lg['p50']:.0f}, p99 {lg['p99']:.0f}, max {lg['max']:.0f} events" if lg else "n/a")
        + (f" (≈ {lg['max'] / max(1, a['rate']):.2f} s of traffic at peak)" if lg else "")
        + f"; after the load: {r['final_lag']} — "
        + (
            "keeps up."
            if r["final_lag"] == 0 and lg and lg["p50"] < a["rate"] / 2
            else "FALLS BEHIND."
            if r["final_lag"] > 0
            else "keeps up on average, with transient backlogs."
        )
        + f" CPU while measuring: worker {r['cpu_worker'] * 100:.0f}% of a core, bench (3 nodes + load) "
        f"{r['cpu_bench'] * 100:.0f}%, whole machine {r['cpu_machine'] * 100:.0f}% busy over all cores "
        f"(≈ {max(0.0, r['cpu_machine'] * ncpu - r['cpu_worker'] - r['cpu_bench']) * 100:.0f}% of a core for "
        f"everything else: the broker and other processes on the machine; load average {r['loadavg']}). "
        f"Load loop late by up to {r['loop_late_max'] * 1000:.0f} ms per tick"
        + (
            f"; the bench's event loop (its 3 nodes see decisions on it) ran a 1 ms sleep late by p50 "
            f"{ms(bl['p50'])}, p99 {ms(bl['p99'])}, max {ms(bl['max'])} ms."
            if (bl := r.get("bench_late"))
            else "."
        )
    )
    others = max(0.0, r["cpu_machine"] * ncpu - r["cpu_worker"] - r["cpu_bench"])
    if others > 0.5:
        add(
            f"**Caution:** other processes used ≈ {others * 100:.0f}% of a core during this run (the machine was "
            "shared); delays and lag are inflated by CPU contention."
        )
    ph = r["phases"]
    if ph:
        add("")
        add(
            f"Worker phases (wall time; {ph['batches']} batches, {ph['batches_per_s']:.1f}/s, "
            f"records per batch p50 {ph['records']['p50']:.0f} / max {ph['records']['max']:.0f}), ms:"
        )
        add("")
        add("| phase | p50 | p90 | p99 | max | mean |")
        add("| --- | --- | --- | --- | --- | --- |")
        for label, key in (
            ("cycle (gap + handle), per batch", "cycle"),
            ("gap: getmany wait between batches", "gap"),
            ("handle: the batch handler, per batch", "handle"),
            ("dedup lookup (`seen_hashes`), per call", "dedup"),
            ("publishing a decision or allowance record (in the background, until acked), per record", "publish"),
            ("ClickHouse write, per call", "write"),
            ("offset commit, per call", "commit"),
            ("age of newest record at batch start", "age_newest"),
            ("age of oldest record at batch start", "age_oldest"),
            ("fast lane: age of newest record when grouped, per fetch", "fast_age_newest"),
            ("fast lane: age of oldest record when grouped, per fetch", "fast_age_oldest"),
            (
                "fast lane: grouping + counting + publishing (its wait for the acks, ≤ 100 ms, included), per fetch",
                "fast_handle",
            ),
            ("event loop: lateness of a 1 ms sleep (how long a task held the loop)", "loop_late"),
        ):
            dd = ph.get(key)
            if dd:
                add(
                    f"| {label} | {ms(dd['p50'])} | {ms(dd['p90'])} | {ms(dd['p99'])} | {ms(dd['max'])} | "
                    f"{ms(dd['mean'])} |"
                )
        if ph.get("fast_records"):
            add("")
            add(
                f"Fast lane: {ph['fast_fetches_per_s']:.0f} fetches/s, records per fetch p50 "
                f"{ph['fast_records']['p50']:.0f} / max {ph['fast_records']['max']:.0f}."
                + (
                    f" Decision and allowance records published: {ph['published_per_s']:.0f}/s."
                    if "published_per_s" in ph
                    else ""
                )
            )
    return "\n".join(lines)


def cli_of(a: dict[str, Any]) -> str:
    parts = [
        f"--rate {a['rate']}",
        f"--duration {a['duration']:.0f}",
        f"--batch-timeout-ms {a['batch_timeout_ms']}",
    ]
    parts += [f"--worker-env {kv}" for kv in a["worker_env"]]
    if a["linger_ms"] != 5:
        parts.append(f"--linger-ms {a['linger_ms']}")
    if a["node_fetch_max_wait_ms"] != FETCH_MAX_WAIT_MS:
        parts.append(f"--node-fetch-max-wait-ms {a['node_fetch_max_wait_ms']}")
    if a["plain_worker"]:
        parts.append("--plain-worker")
    if a.get("loop_probe"):
        parts.append("--loop-probe")
    return " ".join(parts)


METHOD = """\
Method: the worker runs as its own process (`meter worker` with per-batch phase timers; unique
topics: 6 event partitions, 3 decision partitions; its own group; fresh chDB directory). The
bench process holds 3 simulated nodes, each a `UsageReporter` (batched idempotent producer,
acks=all, lz4, linger as stated, one chunk in flight) and a `DecisionCache` (follows the
compacted decisions topic). A paced asyncio loop (token bucket, 5 ms ticks) hands events
round-robin to the nodes; a request is admitted only if that node's `DecisionCache.check(key)`
is None (as the middleware does) and is reported either way — admitted as 200, refused as 429,
which the worker does not count. Events are built with `make_event` at ts = now (UTC).
Background keys are drawn uniformly (≈ 13 requests/min each, far under the limits); each hot
key sends its burst round-robin over the nodes and is started only where the whole burst fits
inside one UTC minute. Delay = last node's `on_applied` (monotonic, at `getmany` return) −
the moment `report()` returned for the 100th admitted request of the key; it includes the
reporter's linger and wait for the previous chunk's acks, the broker, the worker's fetch,
batch, dedup lookup and evaluation (decisions are published before the batch's ClickHouse
write), the decision's publish, and each node's fetch. Overshoot = requests admitted across the
cluster − 100 for that key's minute. "handoff → decided" uses the worker's `decided_at` (same
machine clock). Lag = end offsets − the worker group's committed offsets (committed after each
write), sampled each second."""


def write_results(r: dict[str, Any]) -> None:
    body = render(r, for_file=True) + "\n\n" + METHOD + "\n"
    replace_block("decisions", "Decisions", body)


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decisions", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default=os.environ.get("METER_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    p.add_argument("--rate", type=int, default=5_000, help="events/s in total over the 3 nodes")
    p.add_argument("--duration", type=float, default=80.0, help="seconds measured (after warm-up)")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds of background load before measuring")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to wait for late blocks after the load")
    p.add_argument("--keys", type=int, default=20_000, help="background keys")
    p.add_argument("--hot-every", type=float, default=0.3, help="seconds between hot-key starts")
    p.add_argument("--hot-requests", type=int, default=150, help="requests per hot key")
    p.add_argument("--hot-rate", type=float, default=50.0, help="requests/s of one hot key")
    p.add_argument("--window-margin", type=float, default=3.0, help="seconds kept free before a minute ends")
    p.add_argument("--tick-ms", type=float, default=5.0, help="load loop tick")
    p.add_argument(
        "--batch-timeout-ms",
        type=int,
        default=Settings.model_fields["batch_timeout_ms"].default,
        help="worker METER_BATCH_TIMEOUT_MS (default: the product's default)",
    )
    p.add_argument("--worker-env", action="append", default=[], metavar="METER_X=V", help="extra worker env")
    p.add_argument(
        "--linger-ms",
        type=int,
        default=NodeSettings.model_fields["node_report_linger_ms"].default,
        help="the nodes' reporter linger (default: the product's METER_NODE_REPORT_LINGER_MS default)",
    )
    p.add_argument(
        "--node-fetch-max-wait-ms",
        type=int,
        default=FETCH_MAX_WAIT_MS,
        help="DecisionCache fetch_max_wait_ms (default: the product's)",
    )
    p.add_argument("--plain-worker", action="store_true", help="run `python -m worker.cli worker` unmodified")
    p.add_argument(
        "--loop-probe",
        action="store_true",
        help="measure how late the worker's and the bench's event loops run a 1 ms sleep (costs each ~10%% of a core)",
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--no-write", action="store_true", help="do not write bench/results.md")
    p.add_argument("--json", type=Path, help="also dump the raw figures as JSON here")
    p.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def meets_target(delay: dict[str, float] | None) -> bool:
    """DESIGN.md: crossing event published -> visible on all 3 nodes, p50 ≤ 15 ms, p99 ≤ 50 ms."""
    return bool(delay) and delay is not None and delay["p50"] <= 0.015 and delay["p99"] <= 0.050


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_child:
        return worker_child(args.loop_probe)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    result = asyncio.run(bench(args))
    print()
    print(render(result, for_file=False))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if not args.no_write:
        write_results(result)
        print("\nwritten to bench/results.md (## Decisions)")
    d = result["delay"]
    return 0 if meets_target(d) else 1


if __name__ == "__main__":
    sys.exit(main())
