"""Ingest benchmark: a bare aiokafka consumer vs the metering worker on the same pre-loaded topic.

    .venv/bin/python -m bench.ingest [--events 1000000] [--keys 100000] [--profile cprofile]

Steps, all in one process and one run:

1. create a fresh, uniquely named events topic (6 partitions) and pre-load N realistic
   request events over K keys (Zipf-like key popularity, 1-2 endpoints per key, ~95% 2xx,
   3 nodes, event times within the last 10 minutes, one client IP per key);
2. drain it with a bare ``AIOKafkaConsumer`` (own group, ``getmany``, touching only
   ``msg.value``) and time partition assignment → last record in hand;
3. drain it with the worker (``WorkerRuntime`` in-process, chDB in a fresh temp dir) and
   time partition assignment (after the stored-offset lookup and seeks) → the end of the
   batch that brings the consumed count to N (written to ClickHouse, offsets committed).
   Both clocks start when consumption can start, so the first fetch is inside both; the
   group join before it (identical for both) is outside;
4. check that ClickHouse's minute/hour/day ``sum(requests)`` equal the events counted
   (N minus dead-lettered) and that the stored offsets cover every partition's last record;
5. print events/s of both and the ratio, and write them with the machine, date and versions
   to ``bench/results.md`` (section "## Ingest", machine-written block) unless ``--no-write``.

``--profile cprofile|pyinstrument`` profiles the worker phase (the event-loop thread; the
ClickHouse calls run in worker threads and appear as time waited on them). A profiled run's
figures are not written to the results file.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import cProfile
import gc
import logging
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.partitioner import murmur2

from bench.common import (
    BENCH_DIR,
    CpuMeter,
    broker_pid,
    commit,
    machine,
    now_utc,
    peak_rss_bytes,
    replace_block,
    reset_peak_rss,
    rss_bytes,
    run_topics,
    versions,
)
from common import kafka_clients
from common.kafka_clients import KafkaTarget
from schemas.events import dump_event, parse_event
from worker.app import WorkerRuntime
from worker.records import KafkaRecord
from worker.settings import Settings
from worker.simulate import key_ids
from worker.store.client import connect
from worker.store.migrations import migrate
from worker.store.rollup import RollupStore
from worker.topics import ensure_topics

log = logging.getLogger("bench.ingest")

FETCH: dict[str, Any] = {
    "max_partition_fetch_bytes": 8 * 1024 * 1024,
    "fetch_max_bytes": 64 * 1024 * 1024,
}  # as the worker

# Realistic traffic shape -------------------------------------------------------------------

ENDPOINTS = (
    ("/v0/payments", "POST"),
    ("/v0/payments/{id}", "GET"),
    ("/v0/rates", "GET"),
    ("/v0/wallets", "GET"),
    ("/v0/wallets/{id}/transfers", "POST"),
    ("/v0/invoices", "POST"),
    ("/v0/invoices/{id}", "GET"),
    ("/v0/webhooks", "POST"),
)
# ~95% 2xx; the rest client errors (incl. 429) and a few server errors
STATUSES = (200,) * 88 + (201,) * 5 + (204,) * 2 + (400, 401, 403, 404) + (429,) + (500,) * 2 + (502, 503)
NODES = ("node-1", "node-2", "node-3")
# Issue 11's targets: events/s of the worker, and its share of the bare consumer's rate.
TARGET_RATE = 150_000
TARGET_RATIO = 0.5
SPREAD_SECONDS = 600


@dataclass
class Preload:
    partitions: dict[int, list[tuple[bytes, bytes]]]  # partition -> [(key, value)]
    events: int
    bytes: int
    active_keys: int
    seconds: float

    @property
    def mean_size(self) -> float:
        return self.bytes / self.events if self.events else 0.0


class EventMaker:
    """Realistic events over ``n_keys`` keys, as wire bytes identical to ``schemas.events.dump_event``.

    Built once (the per-key parts: Zipf-like popularity, a primary and a secondary endpoint,
    an account, one client IP, the partition of the key), then drawn from as often as needed.
    """

    def __init__(self, n_keys: int, partitions: int, seed: int) -> None:
        rng = self.rng = random.Random(seed)
        keys = key_ids(n_keys)
        self.key_bytes = [k.encode() for k in keys]
        self.key_part = [(murmur2(k) & 0x7FFFFFFF) % partitions for k in self.key_bytes]  # aiokafka's partitioner
        # per key: a primary and a secondary endpoint, an account, one client IP
        self.primary = [rng.randrange(len(ENDPOINTS)) for _ in range(n_keys)]
        self.secondary = [rng.randrange(len(ENDPOINTS)) for _ in range(n_keys)]
        accounts = [f"acct-{rng.randrange(max(1, n_keys // 4)):06d}" for _ in range(n_keys)]
        ips = [f"{10 + i % 200}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}" for i in range(n_keys)]
        # per key, the JSON fragments that never change
        self.head = [f'"key_id":"{k}"' for k in keys]
        self.tail_account = [f'"account_id":"{a}"' for a in accounts]
        self.tail_ip = [f'"client_ip":"{ip}"' for ip in ips]
        # Zipf-like popularity (s = 1): the top key sends ~8% of the traffic, the tail one event or none
        self.cum: list[float] = []
        total = 0.0
        for i in range(n_keys):
            total += 1.0 / (i + 1)
            self.cum.append(total)
        self.total = total
        # a random permutation so that heavy keys are spread over partitions
        self.order = list(range(n_keys))
        rng.shuffle(self.order)
        self.seen_keys: set[int] = set()

    def events(self, n: int, seconds: Sequence[str]) -> Iterator[tuple[int, bytes, bytes]]:
        """``n`` events as (partition, key, value), each at a random one of ``seconds``
        (``%Y-%m-%dT%H:%M:%S`` in UTC) plus random microseconds."""
        rng, cum, total, order, seen_keys = self.rng, self.cum, self.total, self.order, self.seen_keys
        primary, secondary, head, tail_account, tail_ip = (
            self.primary,
            self.secondary,
            self.head,
            self.tail_account,
            self.tail_ip,
        )
        rand, randrange, expo, getbits = rng.random, rng.randrange, rng.expovariate, rng.getrandbits
        n_endpoints, n_seconds = len(ENDPOINTS), len(seconds)
        for _ in range(n):
            i = order[bisect.bisect_left(cum, rand() * total)]
            seen_keys.add(i)
            r = rand()
            e = primary[i] if r < 0.8 else secondary[i] if r < 0.97 else randrange(n_endpoints)
            endpoint, method = ENDPOINTS[e]
            value = (
                f'{{"v":1,"request_id":"{getbits(128):032x}",{head[i]},"node_id":"{NODES[randrange(3)]}",'
                f'"method":"{method}","endpoint":"{endpoint}","status":{STATUSES[randrange(100)]},'
                f'"ts":"{seconds[randrange(n_seconds)]}.{randrange(1_000_000):06d}Z",{tail_account[i]},'
                f'"latency_ms":{round(expo(0.025), 2)!r},{tail_ip[i]},"bytes_out":{randrange(200, 4000)}}}'
            ).encode()
            yield self.key_part[i], self.key_bytes[i], value


def utc_seconds(start: int, count: int) -> list[str]:
    """``count`` consecutive seconds from epoch ``start``, formatted as events carry them."""
    return [datetime.fromtimestamp(start + s, UTC).strftime("%Y-%m-%dT%H:%M:%S") for s in range(count)]


def generate(n: int, n_keys: int, partitions: int, seed: int, now: float) -> Preload:
    """Wire bytes of ``n`` events within the ``SPREAD_SECONDS`` before ``now`` (``EventMaker``)."""
    started = time.perf_counter()
    maker = EventMaker(n_keys, partitions, seed)
    out: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in range(partitions)}
    nbytes = 0
    for part, key, value in maker.events(n, utc_seconds(int(now) - SPREAD_SECONDS, SPREAD_SECONDS)):
        nbytes += len(value)
        out[part].append((key, value))
    return Preload(out, n, nbytes, len(maker.seen_keys), time.perf_counter() - started)


def check_wire_format(preload: Preload, sample: int = 2000) -> None:
    """The generated bytes must be exactly what a node's ``dump_event`` would publish."""
    rng = random.Random(1)
    for part, records in preload.partitions.items():
        for key, value in rng.sample(records, min(sample // len(preload.partitions), len(records))):
            event = parse_event(value)
            if dump_event(event) != value or event["key_id"].encode() != key:
                raise SystemExit(f"generated event differs from dump_event (partition {part}): {value!r}")


def bulk_producer(kafka: KafkaTarget) -> AIOKafkaProducer:
    """A producer for pre-built record batches of ~900 KB: acks=1, no linger, no compression."""
    return kafka_clients.producer(
        kafka,
        acks=1,
        linger_ms=0,
        max_batch_size=900_000,
        max_request_size=1_000_000,
        compression_type=None,
        request_timeout_ms=60_000,
    )


async def send_records(
    producer: AIOKafkaProducer, topic: str, partitions: Mapping[int, Sequence[tuple[bytes, bytes]]]
) -> None:
    """Send each partition's (key, value) records in record batches, many in flight; wait for all."""
    in_flight: list[asyncio.Future[Any]] = []
    for part, records in partitions.items():
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                batch.close()
                in_flight.append(await producer.send_batch(batch, topic, partition=part))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
            if len(in_flight) >= 64:
                await asyncio.gather(*in_flight)
                in_flight.clear()
        batch.close()
        in_flight.append(await producer.send_batch(batch, topic, partition=part))
    await asyncio.gather(*in_flight)


async def produce(kafka: KafkaTarget, topic: str, preload: Preload) -> float:
    """Pre-load the topic (``bulk_producer``, ``send_records``)."""
    started = time.perf_counter()
    producer = bulk_producer(kafka)
    await producer.start()
    try:
        await send_records(producer, topic, preload.partitions)
    finally:
        await producer.stop()
    return time.perf_counter() - started


# Phase (i): bare consumer --------------------------------------------------------------------


@dataclass
class Drain:
    records: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class _MarkAssigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, cpu: CpuMeter) -> None:
        self.at: float | None = None
        self.cpu = cpu

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if assigned and self.at is None:
            self.at = time.perf_counter()
            self.cpu.start()


async def drain_bare(
    kafka: KafkaTarget, topic: str, n: int, group: str, cpu: CpuMeter, stall_seconds: float = 60.0
) -> Drain:
    """Time (and ``cpu``) from partition assignment (consumption can start) to the last record in hand."""
    consumer = kafka_clients.consumer(
        kafka,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **FETCH,
    )
    assigned = _MarkAssigned(cpu)
    consumer.subscribe([topic], listener=assigned)
    await consumer.start()
    count = touched = 0
    first: float | None = None
    last_progress = time.monotonic()
    try:
        while count < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=100_000)
            if not batches:
                if time.monotonic() - last_progress > stall_seconds:
                    raise SystemExit(f"bare consumer stalled at {count}/{n} records")
                continue
            if first is None:
                first = time.perf_counter()
            last_progress = time.monotonic()
            for msgs in batches.values():
                for msg in msgs:
                    touched += len(msg.value)
                count += len(msgs)
        done = time.perf_counter()
        cpu.stop()
    finally:
        await consumer.stop()
    assert assigned.at is not None
    assert first is not None
    return Drain(count, done - assigned.at, {"bytes": touched, "first_batch_after": first - assigned.at, "cpu": cpu})


# Phase (ii): the worker ----------------------------------------------------------------------


class TimedStore(RollupStore):
    """The real store, timing its two ingest calls (they run in worker threads)."""

    def __init__(self, client: Any, database: str, lookup_client: Any = None) -> None:
        super().__init__(client, database, lookup_client)
        self.write_seconds = 0.0
        self.writes = 0
        self.seen_seconds = 0.0

    def write(self, rows: pa.Table, token: str) -> None:
        started = time.perf_counter()
        super().write(rows, token)
        self.write_seconds += time.perf_counter() - started
        self.writes += 1

    def seen_hashes(self, minutes_by_partition: Mapping[int, Iterable[int]], hashes: Sequence[int]) -> set[int]:
        started = time.perf_counter()
        try:
            return super().seen_hashes(minutes_by_partition, hashes)
        finally:
            self.seen_seconds += time.perf_counter() - started


class GcTimer:
    """Time spent in the cyclic garbage collector, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> str:
        total = sum(self.seconds)
        per = ", ".join(
            f"gen{g} {n}x {s:.2f}s" for g, (n, s) in enumerate(zip(self.collections, self.seconds, strict=True))
        )
        return f"{total:.2f}s ({per})"


def apply_gc_mode(mode: str, gen0: int | None = None) -> None:
    """The worker tunes the GC itself at start-up (``worker.app.tune_gc``); the bench can undo
    that (``untuned``: Python's defaults, as before) or try another gen0 threshold."""
    import worker.app

    if mode == "untuned":
        worker.app.tune_gc = lambda: None
        gc.set_threshold(700, 10, 10)
    elif gen0 is not None:
        worker.app.GC_THRESHOLDS = (gen0, *worker.app.GC_THRESHOLDS[1:])


@contextlib.contextmanager
def profiling(kind: str, out: Path) -> Any:
    if kind == "none":
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "cprofile":
        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            prof.dump_stats(str(out.with_suffix(".prof")))
            stats = pstats.Stats(prof, stream=sys.stdout).strip_dirs()
            print("\n--- cProfile, worker phase, by own time ---")
            stats.sort_stats("tottime").print_stats(30)
            print("--- by cumulative time ---")
            stats.sort_stats("cumulative").print_stats(40)
            print(f"profile saved to {out.with_suffix('.prof')}")
    else:
        from pyinstrument import Profiler  # optional: pip install pyinstrument (not a project dependency)

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
        try:
            yield
        finally:
            profiler.stop()
            out.with_suffix(".html").write_text(profiler.output_html())
            print(profiler.output_text(unicode=True, color=False, show_all=False))
            print(f"profile saved to {out.with_suffix('.html')}")


async def drain_worker(
    settings: Settings,
    n: int,
    profile: str,
    gc_mode: str,
    gen0: int | None = None,
    stall_seconds: float = 120.0,
    cpu: CpuMeter | None = None,
) -> Drain:
    cpu = cpu or CpuMeter(None)
    client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    migrate(client, settings)
    # as WorkerRuntime.open builds it: a second client for the dedup lookups
    lookups = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    store = TimedStore(client, settings.clickhouse_database, lookups)
    runtime = WorkerRuntime(settings, store=store)
    apply_gc_mode(gc_mode, gen0)

    rss_before = rss_bytes()
    peak_reset = reset_peak_rss()
    assigned_at: float | None = None  # partitions assigned, stored offsets read, seeks done
    first: float | None = None
    done_at: float | None = None
    finished = asyncio.Event()
    handle_seconds = 0.0

    async def on_batch(_: Any) -> None:
        nonlocal done_at
        assert runtime.consumer is not None
        if runtime.consumer.stats.consumed >= n and done_at is None:
            done_at = time.perf_counter()
            cpu.stop()
            finished.set()

    async def on_assigned(_: set[int]) -> None:
        nonlocal assigned_at
        if assigned_at is None:
            assigned_at = time.perf_counter()
            cpu.start()

    def instrument() -> None:
        consumer = runtime.consumer
        assert consumer is not None
        consumer.on_batch.append(on_batch)
        consumer.on_assigned.append(on_assigned)
        inner = consumer.handle

        async def handle(records: Sequence[KafkaRecord]) -> Any:
            nonlocal first, handle_seconds
            started = time.perf_counter()
            if first is None:
                first = started
            try:
                return await inner(records)
            finally:
                handle_seconds += time.perf_counter() - started

        consumer.handle = handle  # type: ignore[method-assign]

    # The consumer object is built in the lifespan; hook it before the first batch arrives.
    opened = runtime.open

    def open_and_instrument() -> None:
        opened()
        instrument()

    runtime.open = open_and_instrument  # type: ignore[method-assign]

    gc_timer = GcTimer()
    cpu_main, cpu_process = time.thread_time(), time.process_time()
    with gc_timer, profiling(profile, BENCH_DIR / ".profiles" / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}"):
        task = asyncio.create_task(runtime.app.run(log_level=logging.DEBUG))
        last, last_progress = -1, time.monotonic()
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 1.0)
            if task.done():
                task.result()
                raise SystemExit("worker stopped before draining the topic")
            consumed = runtime.consumer.stats.consumed if runtime.consumer else 0
            if consumed != last:
                last, last_progress = consumed, time.monotonic()
            elif time.monotonic() - last_progress > stall_seconds:
                raise SystemExit(f"worker stalled at {consumed}/{n} records")
    cpu_main, cpu_process = time.thread_time() - cpu_main, time.process_time() - cpu_process
    rss_after, peak = rss_bytes(), peak_rss_bytes()
    runtime.app.exit()
    await asyncio.wait_for(task, 60)
    assert assigned_at is not None
    assert first is not None
    assert done_at is not None
    assert runtime.consumer is not None
    stats = runtime.consumer.stats
    return Drain(
        stats.consumed,
        done_at - assigned_at,
        {
            "first_batch_after": first - assigned_at,
            "gc": gc_timer.summary(),
            "cpu_main": cpu_main,
            "cpu_process": cpu_process,
            "cpu": cpu,
            "stats": stats,
            "store": store,
            "handle_seconds": handle_seconds,
            "rss_before": rss_before,
            "rss_delta": rss_after - rss_before,
            "peak_delta": (peak - rss_before) if peak_reset else None,
            "batch_max_records": settings.batch_max_records,
        },
    )


def verify(store: RollupStore, topic: str, counted: int, last_offsets: Mapping[int, int]) -> dict[str, int]:
    """ClickHouse must hold exactly the counted events at every level, and every partition's last offset."""
    client = store._client
    sums = {
        str(level): int(total)
        for level, total in client.query(
            f"SELECT toString(level), sum(requests) FROM {store.table} "
            "WHERE level IN ('minute', 'hour', 'day') GROUP BY level"
        ).result_rows
    }
    problems = [f"{lv}: sum(requests) = {sums.get(lv, 0)} != {counted}" for lv in ("minute", "hour", "day")]
    problems = [p for p, lv in zip(problems, ("minute", "hour", "day"), strict=True) if sums.get(lv, 0) != counted]
    stored = store.stored_offsets(topic, last_offsets)
    if stored != dict(last_offsets):
        problems.append(f"stored offsets {stored} != last offsets {dict(last_offsets)}")
    if problems:
        raise SystemExit("VERIFICATION FAILED: " + "; ".join(problems))
    return sums


# Orchestration -------------------------------------------------------------------------------


async def delete_topics(kafka: KafkaTarget, names: list[str]) -> None:
    admin = kafka_clients.admin(kafka)
    await admin.start()
    try:
        await admin.delete_topics(names)
    except Exception as exc:  # best effort cleanup
        log.warning("could not delete bench topics %s: %s", names, exc)
    finally:
        await admin.close()


def cpu_budget(bare: Drain, worker: Drain) -> str:
    """Core-seconds per 1M events each drain cost the whole machine and the broker, against
    what the target leaves (``TARGET_RATE`` on this machine's cores)."""
    cores = os.cpu_count() or 1
    budget = cores * 1_000_000 / TARGET_RATE

    def per_million(drain: Drain) -> str:
        meter: CpuMeter = drain.extra["cpu"]
        scale = 1_000_000 / drain.records
        broker = f" (broker {meter.process * scale:.1f})" if meter.process is not None else " (broker: not found)"
        return f"{meter.machine * scale:.1f}{broker}"

    return (
        f"CPU per 1M events, whole machine in core-seconds: bare consumer {per_million(bare)}, "
        f"worker {per_million(worker)}; the target leaves {budget:.1f} ({cores} cores at {TARGET_RATE:,} events/s)."
    )


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def report_block(args: argparse.Namespace, pre: Preload, bare: Drain, worker: Drain, produced_s: float) -> str:
    stats, store = worker.extra["stats"], worker.extra["store"]
    ratio = worker.rate / bare.rate
    m = machine()
    v = versions("aiokafka", "faststream", "chdb", "chdb-core", "clickhouse-connect", "pyarrow", "pydantic")
    mib = 1024 * 1024
    peak = worker.extra["peak_delta"]
    target = "met" if ratio >= TARGET_RATIO and worker.rate >= TARGET_RATE else "NOT met"
    lines = [
        f"Run {now_utc()} — `python -m bench.ingest --events {args.events} --keys {args.keys}`"
        + (f" --batch-max-records {args.batch_max_records}" if args.batch_max_records else "")
        + (f" --gc {args.gc}" if args.gc == "untuned" else "")
        + (f" --gc-gen0 {args.gc_gen0}" if args.gc_gen0 else "")
        + f" (code measured: commit {commit('worker', 'common', 'schemas', 'bench/ingest.py')})",
        "",
        "| | events | seconds | events/s |",
        "| --- | ---: | ---: | ---: |",
        f"| bare aiokafka consumer (getmany, touch value) | {bare.records:,} | {bare.seconds:.2f} "
        f"| {fmt_rate(bare.rate)} |",
        f"| worker → ClickHouse (chDB) | {worker.records:,} | {worker.seconds:.2f} | {fmt_rate(worker.rate)} |",
        "",
        f"**Ratio worker / bare: {ratio:.2f}** (target ≥ {TARGET_RATIO:.2f}); worker {fmt_rate(worker.rate)} events/s "
        f"(target ≥ {TARGET_RATE:,}): targets **{target}**.",
        "",
        f"- Topic: {pre.events:,} events, {args.partitions} partitions, "
        f"{args.keys:,} keys ({pre.active_keys:,} active, Zipf s=1), mean value {pre.mean_size:.0f} bytes; "
        f"generated in {pre.seconds:.1f}s, produced in {produced_s:.1f}s.",
        f"- Worker: {stats.batches} batches (batch_max_records {worker.extra['batch_max_records']}), "
        f"{stats.counted:,} counted, {stats.duplicates} duplicates, {sum(stats.rejected.values())} dead-lettered; "
        f"ClickHouse minute/hour/day sum(requests) = {stats.counted:,} each (verified).",
        f"- Worker time split (event-loop thread is one of them): batch handling {worker.extra['handle_seconds']:.2f}s "
        f"of {worker.seconds:.2f}s, of which waiting on ClickHouse: insert {store.write_seconds:.2f}s "
        f"({store.writes} inserts), dedup lookup {store.seen_seconds:.2f}s; cyclic GC {worker.extra['gc']}; "
        f"CPU: event-loop thread {worker.extra['cpu_main']:.2f}s, whole process {worker.extra['cpu_process']:.2f}s "
        "(2 cores shared with the broker).",
        f"- {cpu_budget(bare, worker)}",
        "- Worker memory (process RSS incl. chDB engine and fetch buffers): "
        f"before {worker.extra['rss_before'] / mib:.0f} MiB, "
        f"delta after drain {worker.extra['rss_delta'] / mib:+.0f} MiB"
        + (f", peak delta {peak / mib:+.0f} MiB" if peak is not None else "")
        + ".",
        f"- Machine: {m['nproc']} CPUs ({m['usable cpus']} usable), {m['cpu']}, {m['ram']} RAM, {m['os']}, "
        f"Python {m['python']}; Kafka broker on the same machine (127.0.0.1).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    base = Settings()
    bootstrap = args.bootstrap or base.kafka_bootstrap
    run = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-chdb-"))
    topic_overrides = run_topics(f"bench.ingest.{run}")
    overrides: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        **topic_overrides,
        "consumer_group": f"bench-worker-{run}",
        "events_partitions": args.partitions,
        "clickhouse_dsn": f"chdb://{tmp}",
        "clickhouse_database": "bench",
    }
    if args.batch_max_records:
        overrides["batch_max_records"] = args.batch_max_records
    settings = base.model_copy(update=overrides)
    topics = list(topic_overrides.values())
    try:
        await ensure_topics(settings)
        print(f"generating {args.events:,} events over {args.keys:,} keys ...", flush=True)
        pre = generate(args.events, args.keys, args.partitions, args.seed, time.time())
        check_wire_format(pre)
        print(
            f"  {pre.seconds:.1f}s, mean {pre.mean_size:.0f} bytes, {pre.active_keys:,} active keys; producing ...",
            flush=True,
        )
        produced_s = await produce(settings, settings.events_topic, pre)
        print(f"  produced in {produced_s:.1f}s ({args.events / produced_s:,.0f}/s)", flush=True)
        last_offsets = {p: len(r) - 1 for p, r in pre.partitions.items() if r}
        pre.partitions.clear()  # the worker's memory is measured next: drop the pre-built values

        broker = broker_pid(bootstrap)
        bare = await drain_bare(settings, settings.events_topic, args.events, f"bench-bare-{run}", CpuMeter(broker))
        print(f"bare aiokafka consumer: {bare.records:,} in {bare.seconds:.2f}s = {fmt_rate(bare.rate)} events/s")

        worker = await drain_worker(settings, args.events, args.profile, args.gc, args.gc_gen0, cpu=CpuMeter(broker))
        stats = worker.extra["stats"]
        dlq = sum(stats.rejected.values())
        if stats.counted != args.events - dlq - stats.duplicates:
            raise SystemExit(f"worker counted {stats.counted} of {args.events} ({dlq} DLQ, {stats.duplicates} dup)")
        if dlq or stats.duplicates:
            raise SystemExit(f"unexpected: {dlq} dead-lettered {stats.rejected}, {stats.duplicates} duplicates")
        verify(worker.extra["store"], settings.events_topic, stats.counted, last_offsets)
        ratio = worker.rate / bare.rate
        store = worker.extra["store"]
        print(
            f"worker -> clickhouse:   {worker.records:,} in {worker.seconds:.2f}s = {fmt_rate(worker.rate)} events/s "
            f"({stats.batches} batches; handling {worker.extra['handle_seconds']:.2f}s, "
            f"insert {store.write_seconds:.2f}s, dedup lookup {store.seen_seconds:.2f}s; gc {worker.extra['gc']}; "
            f"CPU: event-loop thread {worker.extra['cpu_main']:.2f}s, whole process {worker.extra['cpu_process']:.2f}s)"
        )
        print(
            f"ratio worker/bare: {ratio:.2f}   (targets: ratio >= {TARGET_RATIO} and >= {TARGET_RATE:,} events/s)   "
            f"worker RSS delta {worker.extra['rss_delta'] / 2**20:+.0f} MiB"
            + (f", peak {peak / 2**20:+.0f} MiB" if (peak := worker.extra["peak_delta"]) is not None else "")
        )
        print(cpu_budget(bare, worker))
        print("verified: ClickHouse minute/hour/day sum(requests) == events counted; stored offsets == last offsets")
        if args.profile != "none" or args.no_write:
            print("(results file not written: profiled or --no-write run)")
        else:
            replace_block("ingest", "Ingest", report_block(args, pre, bare, worker, produced_s))
            print(f"results written to {BENCH_DIR / 'results.md'} (## Ingest)")
        return 0
    finally:
        if not args.keep_topic:
            await delete_topics(settings, topics)
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000, help="events to pre-load (default 1,000,000)")
    p.add_argument("--keys", type=int, default=100_000, help="distinct API keys (default 100,000)")
    p.add_argument("--partitions", type=int, default=6, help="partitions of the bench topic (default 6)")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default: METER_KAFKA_BOOTSTRAP / settings)")
    p.add_argument("--batch-max-records", type=int, default=None, help="override the worker's batch_max_records")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--gc",
        choices=("worker", "tuned", "untuned"),
        default="worker",
        help="worker-phase GC: as the worker tunes it at start (gc.freeze() + higher gen0 threshold; default), "
        "or Python's defaults (untuned); 'tuned' is the old name of 'worker'",
    )
    p.add_argument("--gc-gen0", type=int, default=None, help="try another gen0 threshold than the worker's")
    p.add_argument("--profile", choices=("none", "cprofile", "pyinstrument"), default="none")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results.md")
    p.add_argument("--keep-topic", action="store_true", help="keep the bench topics afterwards")
    p.add_argument("-v", "--verbose", action="store_true", help="worker logs at INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
