"""Soak benchmark: the worker's memory over 10M events, 1M keys and 2 simulated days at a steady rate.

    .venv/bin/python -m bench.soak [--events 10000000] [--keys 1000000] [--rate 12000] [--no-write]

How the 2 days are simulated: the worker refuses events older than its dedup horizon (24 h)
or ahead of its clock by more than the allowed skew, so events cannot simply be 2 days old.
Instead the worker runs on an injected clock (``WorkerRuntime(clock=...)``, which the ingest
validator, the limit engine and the fast lane all read) that follows the producer: event
times advance steadily through 2 simulated UTC days (from midnight two days before today to
today's midnight, so ClickHouse's TTLs, computed from the real now, see the same ages), and
before each chunk is produced the shared clock moves to the end of that chunk's event times.
The worker's own real-time timers (the limit tick every 0.25 s, the idle-key expiry once a
minute) keep running in real time, so at ~700 simulated seconds per real second the idle
expiry runs about every 12 simulated hours.

One run, two processes:

1. a fresh, uniquely named set of topics; the worker (``WorkerRuntime`` in-process, chDB in a
   fresh temp dir) joins and owns every partition of the events topic;
2. a producer process streams the events (``bench.ingest.EventMaker``: Zipf keys, 1-2
   endpoints per key, ~95% 2xx, 3 nodes, ~300 bytes, wire bytes identical to ``dump_event``)
   at a fixed rate, in chunks every 0.1 s;
3. every ``--sample-every`` seconds the worker process samples its RSS, the size of each of its
   in-memory structures (live counters, dedup cache, fast lane's recent requests, allowance and
   decision tables, thresholds) and what chDB's caches hold (``system.metrics``,
   ``system.parts``, ``system.merges``);
4. once the worker has consumed every event: ClickHouse's minute/hour/day ``sum(requests)``
   must equal the events counted, and the stored offsets each partition's last offset;
5. the samples go to ``bench/soak.csv``, a plot of RSS over simulated time to
   ``bench/soak.svg``, the summary (RSS after warm-up within ±15%?) to ``bench/results.md``
   (section "## Soak", machine-written block) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import clickhouse_connect

from bench.common import BENCH_DIR, commit, machine, now_utc, replace_block, rss_bytes, run_topics, versions
from bench.ingest import EventMaker, bulk_producer, delete_topics, send_records, utc_seconds, verify
from common.kafka_clients import KafkaTarget
from worker.app import WorkerRuntime
from worker.dsn import embedded_path
from worker.settings import Settings
from worker.store.client import ENGINE_OPTIONS, connect
from worker.topics import ensure_topics, topic_specs

log = logging.getLogger("bench.soak")

DAY = 86_400
TICK = 0.1  # the producer sends what is due every TICK seconds
MIB = 1024 * 1024

# chDB's memory as the engine reports it (system.metrics), and the server setting capping each.
CHDB_METRICS = {
    "MemoryTracking": "",
    "MarkCacheBytes": "mark_cache_size",
    "IndexMarkCacheBytes": "index_mark_cache_size",
    "UncompressedCacheBytes": "uncompressed_cache_size",
    "IndexUncompressedCacheBytes": "index_uncompressed_cache_size",
    "PrimaryIndexCacheBytes": "primary_index_cache_size",
    "QueryCacheBytes": "query_cache.max_size_in_bytes",
    "QueryConditionCacheBytes": "query_condition_cache_size",
    "MMapCacheCells": "mmap_cache_size",
    "CompiledExpressionCacheBytes": "compiled_expression_cache_size",
    "PageCacheBytes": "page_cache_max_size",
}


@dataclass(frozen=True)
class SoakPlan:
    events: int = 10_000_000
    keys: int = 1_000_000
    partitions: int = 6
    rate: float = 12_000.0  # events/s, produced steadily
    sim_start: int = 0  # epoch of the first event time (0: midnight UTC two days before today)
    sim_seconds: int = 2 * DAY
    warmup_seconds: int = DAY  # of simulated time; RSS is judged after it
    sample_every: float = 10.0  # seconds of real time
    seed: int = 42
    stall_seconds: float = 120.0

    def start(self) -> int:
        return self.sim_start or (int(time.time()) // DAY - 2) * DAY


Sample = dict[str, float]


@dataclass
class SoakRun:
    plan: SoakPlan
    samples: list[Sample] = field(default_factory=list)
    caps: dict[str, str] = field(default_factory=dict)  # chDB server setting -> value
    produced_by_partition: dict[int, int] = field(default_factory=dict)
    produce_seconds: float = 0.0
    counted: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    sums: dict[str, int] = field(default_factory=dict)
    load: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0, 0, 0), (0, 0, 0))
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


# The producer process ------------------------------------------------------------------------


async def produce_steady(
    kafka: KafkaTarget, topic: str, plan: SoakPlan, sim_now: Any, produced: Any
) -> tuple[dict[int, int], float]:
    """Produce ``plan.events`` at ``plan.rate``; event times advance steadily over the simulated
    span, and ``sim_now`` (the worker's clock) moves to each chunk's end before it is sent.
    Returns the events sent per partition and the seconds from the first to the last."""
    maker = EventMaker(plan.keys, plan.partitions, plan.seed)
    start, per_event = plan.start(), plan.sim_seconds / plan.events
    counts = dict.fromkeys(range(plan.partitions), 0)
    producer = bulk_producer(kafka)
    await producer.start()
    try:
        began, sent, parent = time.monotonic(), 0, os.getppid()
        while sent < plan.events:
            if os.getppid() != parent:
                raise SystemExit("the soak's worker process is gone")
            due = min(plan.events, int((time.monotonic() - began) * plan.rate))
            if due <= sent:
                await asyncio.sleep(TICK)
                continue
            n = min(due - sent, int(plan.rate * TICK * 5) + 1)  # behind: catch up, a few ticks at a time
            first = int(start + sent * per_event)
            end = math.ceil(start + (sent + n) * per_event)
            parts: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in range(plan.partitions)}
            for part, key, value in maker.events(n, utc_seconds(first, max(1, end - first))):
                parts[part].append((key, value))
                counts[part] += 1
            sim_now.value = float(max(end, first + 1))
            await send_records(producer, topic, parts)
            sent += n
            produced.value = sent
    finally:
        await producer.stop()
    return counts, time.monotonic() - began


def _producer_main(
    kafka: Settings, topic: str, plan: SoakPlan, sim_now: Any, produced: Any, result: Connection
) -> None:
    result.send(asyncio.run(produce_steady(kafka, topic, plan, sim_now, produced)))


# Sampling --------------------------------------------------------------------------------------


def structure_sizes(runtime: WorkerRuntime) -> Sample:
    """Entries of each in-memory structure of the worker (read from the objects: it is a bench)."""
    limits, consumer = runtime.limits, runtime.consumer
    assert limits is not None
    assert consumer is not None
    engine = limits.engine
    recent = consumer.pipeline.recent
    exchange = consumer.pipeline.exchange
    return {
        "live_keys": engine.live_keys(),
        "window_starts": sum(len(c._starts) for c in engine.partitions.values()),
        "hot_keys": len(engine.hot),
        "blocks": len(engine.blocks),
        "block_expiry_heap": len(engine._expiry),
        "decision_versions": len(engine.versions),
        "allowance_versions": len(engine.allowance_versions),
        "latest_decisions": len(limits._latest),
        "thresholds_fired": len(engine.thresholds.fired) if engine.thresholds is not None else 0,
        "nodes_seen": len(engine.nodes_seen),
        "fast_lane_recent": len(limits.fast_lane.recent),
        "dedup_cache_hashes": recent.size if recent is not None else 0,
        "dedup_cache_minutes": len(recent._sets) if recent is not None else 0,
        "dedup_store_minutes": sum(len(m) for m in recent._incomplete.values()) if recent is not None else 0,
        "notify_outbox": limits.notifier.waiting()[1] + len(limits._landed),
        "address_table_bytes": consumer.pipeline.addresses.nbytes,
        "multi_address_keys": consumer.pipeline.addresses.multi_address_keys,
        "checked_rows_to_ingest": exchange.to_ingest.size if exchange is not None else 0,
        "checked_rows_to_fast_lane": exchange.to_fast_lane.size if exchange is not None else 0,
    }


def chdb_sizes(client: Any) -> Sample:
    """What the engine holds: its tracked memory, each cache, primary keys of active parts, merges."""
    names = ", ".join(f"'{m}'" for m in CHDB_METRICS)
    out: Sample = dict.fromkeys(CHDB_METRICS, 0.0)
    for metric, value in client.query(
        f"SELECT metric, value FROM system.metrics WHERE metric IN ({names})"
    ).result_rows:
        out[str(metric)] = float(value)
    parts, rows, pk, disk = client.query(
        "SELECT count(), sum(rows), sum(primary_key_bytes_in_memory_allocated), sum(bytes_on_disk) "
        "FROM system.parts WHERE active"
    ).result_rows[0]
    merges, merge_memory, merge_parts, merge_bytes = client.query(
        "SELECT count(), sum(memory_usage), sum(num_parts), sum(total_size_bytes_compressed) FROM system.merges"
    ).result_rows[0]
    out |= {
        "active_parts": float(parts),
        "part_rows": float(rows),
        "primary_key_bytes": float(pk),
        "bytes_on_disk": float(disk),
        "merges": float(merges),
        "merge_memory": float(merge_memory),
        "merge_source_parts": float(merge_parts),
        "merge_source_bytes": float(merge_bytes),
    }
    return out


def chdb_caps(client: Any) -> dict[str, str]:
    names = ", ".join(f"'{s}'" for s in CHDB_METRICS.values() if s)
    rows = client.query(f"SELECT name, value FROM system.server_settings WHERE name IN ({names})").result_rows
    return {str(name): str(value) for name, value in rows}


async def take_sample(runtime: WorkerRuntime, probe: Any, started: float, sim_now: Any, produced: Any) -> Sample:
    assert runtime.consumer is not None
    assert runtime.limits is not None
    stats = runtime.consumer.stats
    sample: Sample = {
        "t": round(time.monotonic() - started, 2),
        "sim_time": sim_now.value,
        "produced": produced.value,
        "consumed": stats.consumed,
        "fast_lane_records": runtime.limits.fast_lane.records,
        "rss": rss_bytes(),
        "python_blocks": sys.getallocatedblocks(),
    }
    sample |= structure_sizes(runtime)
    sample |= await asyncio.to_thread(chdb_sizes, probe)
    return sample


# The run ---------------------------------------------------------------------------------------


async def _owns_all(runtime: WorkerRuntime, partitions: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while runtime.consumer is None or len(runtime.consumer.owned) < partitions:
        if time.monotonic() > deadline:
            raise SystemExit(f"the worker was not assigned the {partitions} partitions within {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _sample_until_drained(
    runtime: WorkerRuntime,
    plan: SoakPlan,
    probe: Any,
    sim_now: Any,
    produced: Any,
    producer: Any,
    on_sample: Callable[[Sample], None],
) -> list[Sample]:
    assert runtime.consumer is not None
    assert runtime.limits is not None
    stats, lane = runtime.consumer.stats, runtime.limits.fast_lane
    samples: list[Sample] = []
    started = time.monotonic()
    next_sample = started
    last_progress, last_consumed = started, -1
    while True:
        drained = stats.consumed >= plan.events and lane.records >= plan.events
        if time.monotonic() >= next_sample or drained:
            samples.append(await take_sample(runtime, probe, started, sim_now, produced))
            on_sample(samples[-1])
            next_sample += plan.sample_every
        if drained:
            return samples
        if producer.exitcode not in (None, 0):
            raise SystemExit(f"the producer process failed (exit code {producer.exitcode})")
        if stats.consumed != last_consumed:
            last_consumed, last_progress = stats.consumed, time.monotonic()
        elif time.monotonic() - last_progress > plan.stall_seconds:
            raise SystemExit(f"worker stalled at {stats.consumed}/{plan.events} records")
        await asyncio.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))


async def run_soak(
    settings: Settings,
    plan: SoakPlan,
    on_sample: Callable[[Sample], None] = lambda s: None,
    engine_options: Mapping[str, str] | None = None,
) -> SoakRun:
    """One soak run against ``settings`` (topics and chDB): samples and verified counts.
    ``engine_options``: chDB server settings to start the engine with besides the shipped
    configuration (an experiment: the worker itself starts it with what ``worker.store.client`` gives)."""
    if plan.partitions != settings.events_partitions:
        raise ValueError(
            f"plan.partitions {plan.partitions} != settings.events_partitions {settings.events_partitions}"
        )
    run = SoakRun(plan)
    ctx = mp.get_context("spawn")
    sim_now = ctx.RawValue("d", float(plan.start()))
    produced = ctx.RawValue("q", 0)
    runtime = WorkerRuntime(settings, clock=lambda: float(sim_now.value))
    await ensure_topics(settings)
    if engine_options:  # the first client on a path starts the engine: its options hold for the others
        path = embedded_path(settings.clickhouse_dsn)
        if path is None:
            raise ValueError("engine options need an embedded (chdb://) store")
        path.mkdir(parents=True, exist_ok=True)
        options = {**ENGINE_OPTIONS, **engine_options}  # the shipped configuration too
        starter = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn, chdb_options=options)
    cpu, wall, load = time.process_time(), time.monotonic(), os.getloadavg()
    async with runtime.running():
        await _owns_all(runtime, plan.partitions)
        probe = await asyncio.to_thread(connect, settings.clickhouse_dsn, settings.clickhouse_database)
        run.caps = await asyncio.to_thread(chdb_caps, probe)
        receive, send = ctx.Pipe(duplex=False)
        args = (settings, settings.events_topic, plan, sim_now, produced, send)
        producer = ctx.Process(target=_producer_main, args=args, name="soak-producer", daemon=True)
        producer.start()
        try:
            run.samples = await _sample_until_drained(runtime, plan, probe, sim_now, produced, producer, on_sample)
            if not await asyncio.to_thread(receive.poll, 60):
                raise SystemExit("the producer did not report its counts")
            run.produced_by_partition, run.produce_seconds = receive.recv()
        finally:
            if producer.is_alive():
                producer.terminate()
            producer.join(10)
        run.cpu_seconds, run.wall_seconds = time.process_time() - cpu, time.monotonic() - wall
        run.load = (load, os.getloadavg())
        assert runtime.consumer is not None
        stats = runtime.consumer.stats
        run.counted, run.duplicates = stats.counted, stats.duplicates
        run.dead_lettered = sum(stats.rejected.values())
        if run.counted != plan.events - run.dead_lettered - run.duplicates:
            raise SystemExit(f"worker counted {run.counted} of {plan.events} ({stats.summary()})")
        if run.dead_lettered or run.duplicates:  # e.g. ts_too_old: a backlog longer than the horizon
            raise SystemExit(f"unexpected dead letters or duplicates, not a steady run: {stats.summary()}")
        last_offsets = {p: n - 1 for p, n in run.produced_by_partition.items() if n}
        run.sums = await asyncio.to_thread(verify, runtime.store, settings.events_topic, run.counted, last_offsets)
        probe.close()
    if engine_options:
        starter.close()
    return run


# Summary, data file, plot ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    warm: list[Sample]  # samples after the warm-up
    mean: float
    low: float
    high: float

    @property
    def below(self) -> float:
        return self.low / self.mean - 1 if self.mean else 0.0

    @property
    def above(self) -> float:
        return self.high / self.mean - 1 if self.mean else 0.0

    @property
    def drift(self) -> float:
        """Last sample after the warm-up against the first."""
        return self.warm[-1]["rss"] / self.warm[0]["rss"] - 1 if self.warm else 0.0

    @property
    def met(self) -> bool:
        return bool(self.warm) and self.below >= -0.15 and self.above <= 0.15


def judge(run: SoakRun) -> Verdict:
    cut = run.plan.start() + run.plan.warmup_seconds
    warm = [s for s in run.samples if s["sim_time"] > cut]
    rss = [s["rss"] for s in warm] or [0.0]
    return Verdict(warm, sum(rss) / len(rss), min(rss), max(rss))


def write_csv(run: SoakRun, path: Path) -> None:
    columns = list(run.samples[0])
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["sim_hours", *columns])
        for s in run.samples:
            out.writerow([f"{(s['sim_time'] - run.plan.start()) / 3600:.3f}", *(f"{s[c]:.15g}" for c in columns)])


def _polyline(points: Sequence[tuple[float, float]], color: str, dash: str = "") -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{color}" stroke-width="2"{extra} points="{coords}"/>'


def svg_plot(run: SoakRun, verdict: Verdict) -> str:
    """RSS and chDB's tracked memory over simulated hours, the warm-up shaded, the ±15% band."""
    width, height, left, right, top, bottom = 760, 380, 64, 20, 36, 48
    start, hours = run.plan.start(), run.plan.sim_seconds / 3600
    series = {
        "process RSS": ("#1f5fa8", [s["rss"] / MIB for s in run.samples]),
        "chDB MemoryTracking": ("#d9730d", [s["MemoryTracking"] / MIB for s in run.samples]),
    }
    xs = [(s["sim_time"] - start) / 3600 for s in run.samples]
    top_mib = max(max(v) for _, v in series.values()) * 1.15
    step = 10 ** math.floor(math.log10(top_mib / 4)) if top_mib > 0 else 1
    step *= next(m for m in (1, 2, 5, 10) if top_mib / (step * m) <= 6)

    def px(h: float) -> float:
        return left + (width - left - right) * h / hours

    def py(mib: float) -> float:
        return height - bottom - (height - top - bottom) * mib / top_mib

    warm_x = px(run.plan.warmup_seconds / 3600)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<rect x="{left}" y="{top}" width="{warm_x - left:.1f}" height="{height - top - bottom}" fill="#eeeeee"/>',
        f'<text x="{(left + warm_x) / 2:.1f}" y="{top + 16}" text-anchor="middle" fill="#777">warm-up</text>',
        f'<text x="{left}" y="20" font-size="14">bench/soak.py: worker memory over {run.plan.events:,} events, '
        f"{run.plan.keys:,} keys, {hours:.0f} simulated hours</text>",
    ]
    for i in range(int(top_mib // step) + 1):
        y = py(i * step)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{i * step:g}</text>')
    for h in range(0, int(hours) + 1, 6):
        parts.append(f'<text x="{px(h):.1f}" y="{height - bottom + 16}" text-anchor="middle">{h}</text>')
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">simulated hours</text>'
        f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(top + height - bottom) / 2})">MiB</text>'
    )
    if verdict.warm:
        band = [(warm_x, py(verdict.mean * f / MIB)) for f in (0.85, 1.15)]
        for _, y in band:
            parts.append(_polyline([(warm_x, y), (px(hours), y)], "#1f5fa8", "4 4"))
    for i, (name, (color, values)) in enumerate(series.items()):
        parts.append(_polyline([(px(x), py(v)) for x, v in zip(xs, values, strict=True)], color))
        y = top + 14 + 16 * i
        parts.append(f'<line x1="{width - 250}" y1="{y - 4}" x2="{width - 226}" y2="{y - 4}" stroke="{color}" ')
        parts[-1] += f'stroke-width="2"/><text x="{width - 220}" y="{y}">{name}</text>'
    parts.append(f'<text x="{width - 220}" y="{top + 46}" fill="#1f5fa8">- - ±15% of the mean RSS after warm-up</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# The results block -------------------------------------------------------------------------------

STRUCTURES = {
    "live_keys": "live window counters: keys with a count today (idle ones expired once a real minute)",
    "window_starts": "shared window-start ints (pruned with the idle keys)",
    "hot_keys": "allowances: keys past the allowance threshold in a current window",
    "blocks": "keys blocked now",
    "block_expiry_heap": "blocks waiting for their end",
    "decision_versions": "last decision version per key (forgotten with the idle keys)",
    "allowance_versions": "last allowance version per key (forgotten with the idle keys)",
    "latest_decisions": "newest decision per key seen on the decisions topic (dropped once settled)",
    "thresholds_fired": "keys with a threshold notified today (expired daily)",
    "nodes_seen": "nodes heard from within a minute",
    "fast_lane_recent": "fast lane's recent request hashes: "
    "METER_FAST_LANE_RECENT_REQUESTS = {fast_lane_recent_requests:,}",
    "dedup_cache_hashes": "recent-hash dedup cache: METER_DEDUP_CACHE_MAX_HASHES = {dedup_cache_max_hashes:,}",
    "dedup_cache_minutes": "(partition, minute) sets of the dedup cache",
    "dedup_store_minutes": "minutes the dedup cache forgot (asked of the store; pruned past the dedup horizon)",
    "notify_outbox": "notifications waiting to be published or recorded",
    "address_table_bytes": "bytes of the first-address tables of the client address counts (2 days kept)",
    "multi_address_keys": "keys with 2+ client addresses on a day kept (a set of fingerprints each)",
    "checked_rows_to_ingest": "rows the fast lane checked, waiting for the ingest path: "
    "METER_FAST_LANE_HANDOFF_ROWS = {fast_lane_handoff_rows:,}",
    "checked_rows_to_fast_lane": "rows the ingest path checked, waiting for the fast lane (same bound)",
}


_ALIGN = "| --- | --- | ---: | ---: | ---: |"


def _mib(x: float) -> str:
    return f"{x / MIB:,.0f}"


def _at_warmup_end(run: SoakRun, verdict: Verdict) -> Sample:
    before = [s for s in run.samples if s not in verdict.warm]
    return before[-1] if before else run.samples[0]


def _structure_rows(run: SoakRun, verdict: Verdict, settings: Settings) -> list[str]:
    rows = [
        "| structure (entries) | bound | end of warm-up | max after warm-up | end |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    edge, last = _at_warmup_end(run, verdict), run.samples[-1]
    for name, bound in STRUCTURES.items():
        peak = max((s[name] for s in verdict.warm), default=0.0)
        text = bound.format(**settings.model_dump())
        rows.append(f"| `{name}` | {text} | {edge[name]:,.0f} | {peak:,.0f} | {last[name]:,.0f} |")
    rows.append(
        f"| Python heap blocks (`sys.getallocatedblocks`) | | {edge['python_blocks']:,.0f} "
        f"| {max((s['python_blocks'] for s in verdict.warm), default=0):,.0f} | {last['python_blocks']:,.0f} |"
    )
    return rows


def _chdb_rows(run: SoakRun, verdict: Verdict) -> list[str]:
    rows = [
        "| chDB | cap (server setting) | end of warm-up | max after warm-up | end |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    edge, last = _at_warmup_end(run, verdict), run.samples[-1]
    sized = [*CHDB_METRICS, "primary_key_bytes", "merge_memory"]
    for name in sized:
        setting = CHDB_METRICS.get(name, "")
        cap = f"`{setting}` = {run.caps.get(setting, '?')}" if setting else ""
        unit = _mib if name != "MMapCacheCells" else (lambda x: f"{x:,.0f} cells")
        peak = max((s[name] for s in verdict.warm), default=0.0)
        label = f"`{name}`" + (" (MiB)" if name != "MMapCacheCells" else "")
        rows.append(f"| {label} | {cap} | {unit(edge[name])} | {unit(peak)} | {unit(last[name])} |")
    rows.append(
        f"| active parts / rows | | {edge['active_parts']:,.0f} / {edge['part_rows']:,.0f} "
        f"| | {last['active_parts']:,.0f} / {last['part_rows']:,.0f} |"
    )
    return rows


def _command(args: argparse.Namespace) -> str:
    flags = [f"--events {args.events}", f"--keys {args.keys}", f"--rate {args.rate:g}"]
    if (args.sim_hours, args.warmup_hours) != (48, 24):
        flags.append(f"--sim-hours {args.sim_hours:g} --warmup-hours {args.warmup_hours:g}")
    flags += [f"--engine-option {o}" for o in args.engine_option]
    if args.sample_every != 10:
        flags.append(f"--sample-every {args.sample_every:g}")
    return "python -m bench.soak " + " ".join(flags)


def report_block(run: SoakRun, verdict: Verdict, settings: Settings, args: argparse.Namespace) -> str:
    plan, first, last = run.plan, run.samples[0], run.samples[-1]
    m = machine()
    v = versions("aiokafka", "faststream", "chdb", "chdb-core", "clickhouse-connect", "pyarrow", "pydantic")
    lag = max(s["produced"] - s["consumed"] for s in run.samples)
    start = time.strftime("%Y-%m-%d %H:%M", time.gmtime(plan.start()))
    end = time.strftime("%Y-%m-%d %H:%M", time.gmtime(plan.start() + plan.sim_seconds))
    warm_h = (verdict.warm[0]["sim_time"] - plan.start()) / 3600 if verdict.warm else 0.0
    lines = [
        f"Run {now_utc()} — `{_command(args)}` (commit {commit('worker', 'schemas', 'common', 'bench')}); "
        f"samples in `bench/soak.csv`, plot `bench/soak.svg`.",
        "",
        f"- Load: {plan.events:,} events over {plan.keys:,} keys (Zipf s=1, the generator of `bench.ingest`), "
        f"event times advancing steadily from {start} to {end} UTC; produced by a separate process at "
        f"{plan.rate:,.0f} events/s (achieved {plan.events / run.produce_seconds:,.0f}/s over "
        f"{run.produce_seconds:.0f} s). The worker runs on a clock that follows the producer (see the docstring "
        f"of `bench/soak.py`); largest backlog at a sample: {lag:,.0f} events ({lag / plan.rate:.0f} s of production).",
        f"- RSS (the worker process: Python, chDB engine, Kafka fetch buffers), sampled every "
        f"{plan.sample_every:g} s: before the first event {_mib(first['rss'])} MiB, at the end of the warm-up "
        f"(the first simulated day) {_mib(_at_warmup_end(run, verdict)['rss'])} MiB, "
        f"at the end {_mib(last['rss'])} MiB, "
        f"peak {_mib(max(s['rss'] for s in run.samples))} MiB.",
        "",
        "| after warm-up (simulated day 2) | samples | min | mean | max | min vs mean | max vs mean | drift |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| RSS (MiB) | {len(verdict.warm)} | {_mib(verdict.low)} | {_mib(verdict.mean)} | {_mib(verdict.high)} "
        f"| {verdict.below:+.1%} | {verdict.above:+.1%} | {verdict.drift:+.1%} |",
        "",
        f"**RSS after warm-up within ±15% of its mean: {'met' if verdict.met else 'NOT met'}** "
        f"(samples from simulated hour {warm_h:.1f} to {(last['sim_time'] - plan.start()) / 3600:.1f}; "
        "drift = last sample against the first after warm-up).",
        "",
        *_structure_rows(run, verdict, settings),
        "",
        *_chdb_rows(run, verdict),
        "",
        f"- Counts verified: {run.counted:,} counted, {run.dead_lettered} dead-lettered, {run.duplicates} "
        f"duplicates; ClickHouse minute/hour/day sum(requests) = {run.sums.get('minute', 0):,} each; stored "
        "offsets = each partition's last offset.",
        f"- Machine: {m['nproc']} CPUs ({m['usable cpus']} usable), {m['cpu']}, {m['ram']} RAM, {m['os']}, "
        f"Python {m['python']}; Kafka broker and the producer process on the same machine, which other "
        f"engineers' work shares: load average {run.load[0][0]:.2f} before, {run.load[1][0]:.2f} after; "
        f"worker process CPU {run.cpu_seconds:.0f} s over {run.wall_seconds:.0f} s.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
    ]
    return "\n".join(lines)


def print_sample(plan: SoakPlan) -> Callable[[Sample], None]:
    def show(s: Sample) -> None:
        print(
            f"t {s['t']:6.0f}s  sim {(s['sim_time'] - plan.start()) / 3600:5.1f}h  produced {s['produced']:>10,.0f}  "
            f"consumed {s['consumed']:>10,.0f}  RSS {_mib(s['rss']):>6} MiB  chDB {_mib(s['MemoryTracking']):>6} MiB  "
            f"live keys {s['live_keys']:>9,.0f}  dedup {s['dedup_cache_hashes']:>9,.0f}  "
            f"parts {s['active_parts']:.0f}",
            flush=True,
        )

    return show


async def main_async(args: argparse.Namespace) -> int:
    run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-chdb-"))
    settings = soak_settings(Settings(), run_id, f"chdb://{tmp}", args.bootstrap, args.partitions)
    plan = SoakPlan(
        events=args.events,
        keys=args.keys,
        partitions=args.partitions,
        rate=args.rate,
        sim_seconds=round(args.sim_hours * 3600),
        warmup_seconds=round(args.warmup_hours * 3600),
        sample_every=args.sample_every,
        seed=args.seed,
    )
    try:
        options = dict(o.split("=", 1) for o in args.engine_option)
        run = await run_soak(settings, plan, print_sample(plan), options)
    finally:
        await delete_topics(settings, [spec.name for spec in topic_specs(settings)])
        shutil.rmtree(tmp, ignore_errors=True)
    verdict = judge(run)
    block = report_block(run, verdict, settings, args)
    print(block)
    if args.csv:
        write_csv(run, args.csv)
    if args.no_write:
        print("(results not written: --no-write)")
        return 0
    write_csv(run, BENCH_DIR / "soak.csv")
    (BENCH_DIR / "soak.svg").write_text(svg_plot(run, verdict))
    replace_block("soak", "Soak", block)
    print(f"results written to {BENCH_DIR / 'results.md'} (## Soak), bench/soak.csv, bench/soak.svg")
    return 0


def soak_settings(base: Settings, run_id: str, dsn: str, bootstrap: str | None, partitions: int) -> Settings:
    """Fresh topics and group for one run; no HTTP listener."""
    overrides: dict[str, Any] = dict(run_topics(f"bench.soak.{run_id}"))
    overrides |= {
        "kafka_bootstrap": bootstrap or base.kafka_bootstrap,
        "consumer_group": f"bench-soak-{run_id}",
        "events_partitions": partitions,
        "clickhouse_dsn": dsn,
        "clickhouse_database": "bench",
        "http_port": 0,
    }
    return base.model_copy(update=overrides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=12_000.0, help="events/s produced (default 12,000)")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--sim-hours", type=float, default=48.0, help="simulated span of the event times (default 48)")
    p.add_argument("--warmup-hours", type=float, default=24.0, help="simulated warm-up, not judged (default 24)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default: METER_KAFKA_BOOTSTRAP / settings)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--engine-option", action="append", default=[], metavar="NAME=VALUE", help="start chDB with it")
    p.add_argument("--csv", type=Path, default=None, help="also write the samples here")
    p.add_argument("--no-write", action="store_true", help="do not write results.md, soak.csv, soak.svg")
    p.add_argument("-v", "--verbose", action="store_true", help="worker logs at INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s %(message)s"
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
