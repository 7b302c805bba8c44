"""Bytes on disk per event, per rollup level: the input of the sizing table in docs/scaling.md.

    .venv/bin/python -m bench.disk [--events 1000000] [--keys 100000]

Pre-loads N events (the generator of ``bench.ingest``: Zipf keys, 1-2 endpoints per key, 3
nodes, times within the last 10 minutes), drains them with the worker into a fresh chDB
store, merges, then copies each level into a table of its own (same engine and order) to
read its compressed size; writes "## Disk" in bench/results.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import machine, now_utc, replace_block, run_topics, versions
from bench.ingest import delete_topics, drain_worker, generate, produce
from worker.settings import Settings
from worker.store import rollup
from worker.store.client import connect
from worker.topics import ensure_topics

# Every level the rollup table holds, in its enum's order (a level added to it is measured too).
LEVELS = tuple(rollup.LEVELS)


async def main_async(args: argparse.Namespace) -> int:
    base = Settings()
    run = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="bench-disk-"))
    topics = run_topics(f"bench.disk.{run}")
    s = base.model_copy(
        update={
            "kafka_bootstrap": args.bootstrap or base.kafka_bootstrap,
            **topics,
            "consumer_group": f"bench-disk-{run}",
            "clickhouse_dsn": f"chdb://{tmp}",
            "clickhouse_database": "bench",
        }
    )
    try:
        await ensure_topics(s)
        pre = generate(args.events, args.keys, s.events_partitions, 42, time.time())
        await produce(s, s.events_topic, pre)
        pre.partitions.clear()
        await drain_worker(s, args.events, "none", "worker")
        client = connect(s.clickhouse_dsn, s.clickhouse_database)
        client.command("OPTIMIZE TABLE bench.usage_rollup FINAL")
        rows = []
        for level in LEVELS:
            table = f"bench.level_{level}"
            client.command(f"CREATE TABLE {table} AS bench.usage_rollup")
            client.command(f"INSERT INTO {table} SELECT * FROM bench.usage_rollup WHERE level = '{level}'")
            client.command(f"OPTIMIZE TABLE {table} FINAL")
            n, size = client.query(
                "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts "
                "WHERE database = 'bench' AND table = {t:String} AND active",
                parameters={"t": f"level_{level}"},
            ).result_rows[0]
            rows.append((level, int(n or 0), int(size or 0)))
    finally:
        await delete_topics(s, list(topics.values()))
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(size for _, _, size in rows)
    lines = [f"{'level':12} {'rows':>10} {'bytes':>12} {'bytes/event':>12} {'bytes/row':>10}"]
    for level, n, size in rows:
        lines.append(f"{level:12} {n:>10,} {size:>12,} {size / args.events:>12.1f} {size / max(n, 1):>10.1f}")
    lines.append(f"{'all':12} {'':>10} {total:>12,} {total / args.events:>12.1f}")
    print("\n".join(lines))
    if not args.no_write:
        m, v = machine(), versions("chdb", "clickhouse-connect")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        lines_md = [
            "| level | rows | bytes on disk | bytes / event | bytes / row |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        lines_md += [
            f"| {lv} | {n:,} | {size:,} | {size / args.events:.1f} | {size / max(n, 1):.1f} |" for lv, n, size in rows
        ]
        lines_md.append(f"| all | | {total:,} | {total / args.events:.1f} | |")
        body = "\n".join(
            [
                f"Run {now_utc()} — `python -m bench.disk --events {args.events} --keys {args.keys}` (commit {commit})",
                "",
                *lines_md,
                "",
                f"- {args.events:,} events over {args.keys:,} keys within 10 minutes (the ingest bench's generator); "
                "each level copied into its own table after OPTIMIZE FINAL, compressed size from system.parts.",
                "- The minute, hour and day rows collapse events of one key, endpoint, status and node in their "
                "bucket: bytes per event fall as traffic per key grows; dedup rows hold one 8-byte hash per event "
                "for the dedup horizon.",
                f"- Machine: {m['nproc']} CPUs, {m['cpu']}, {m['ram']} RAM; "
                + ", ".join(f"{k} {val}" for k, val in v.items())
                + ".",
            ]
        )
        replace_block("disk", "Disk", body)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--no-write", action="store_true")
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
