"""Memory a merge of ``usage_rollup`` holds, under chDB's defaults and the shipped engine profile.

    .venv/bin/python -m bench.merge_memory [--parts 8] [--events-per-part 200000] [--no-write]

Writes ``--parts`` parts through the ingest's renderer (``BatchAggregate``, one insert each,
merges stopped meanwhile), then ``OPTIMIZE ... FINAL``, and reads the peak memory the engine
tracked for each merge from ``system.part_log``. Each variant runs in a process of its own
(one chDB engine per process) on a fresh store, with the shipped ``worker/store/chdb/``
configuration whose default profile is replaced by the variant's settings. Explains the soak's
RSS band (``bench/soak.py``): a merge is the largest transient allocation of the worker.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import clickhouse_connect

from bench.common import commit, environment_lines, now_utc, replace_block
from worker.ingest.aggregate import BatchAggregate
from worker.records import EventRow
from worker.settings import Settings
from worker.store.client import ENGINE_USERS, engine_profile
from worker.store.migrations import migrate

SQUASH = ("min_insert_block_size_rows", "min_insert_block_size_bytes")
# Variant -> (profile settings, keep the by_bucket projection).
VARIANTS: dict[str, tuple[dict[str, str], bool]] = {
    "chDB defaults": ({}, True),
    "squash blocks only": ({k: v for k, v in engine_profile().items() if k in SQUASH}, True),
    "shipped profile": (engine_profile(), True),
    "shipped profile, no projection": (engine_profile(), False),
}


def rollup_batch(events: int, seed: int, first_offset: int, start_minute: int) -> BatchAggregate:
    """``events`` events of random keys (of 1M) and client IPs over the two days from
    ``start_minute`` (epoch s), rendered as the ingest renders a batch: ~4 rollup rows each."""
    rnd = random.Random(seed)
    rows: list[EventRow] = []
    for n in range(events):
        minute = start_minute + rnd.randrange(2880) * 60
        ip = f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}"
        key = f"key_{rnd.randrange(1_000_000):07d}"
        rows.append(
            (
                n % 4,
                key,
                "acct_1",
                minute,
                "GET /v1/x",
                200,
                f"node-{n % 3}",
                ip,
                512,
                3.5,
                rnd.getrandbits(63),
                1,
                "",
                float(minute),
                None,
                0,
            )
        )
    last = first_offset + events - 1
    return BatchAggregate(rows, dict.fromkeys(range(4), last), dict.fromkeys(range(4), first_offset))


def _engine_config(directory: Path, profile: dict[str, str]) -> Path:
    """The shipped configuration with ``profile`` as the default profile, and part_log on."""
    users = ET.parse(ENGINE_USERS)
    default = users.getroot().find("profiles/default")
    assert default is not None
    for child in list(default):
        default.remove(child)
    for name, value in profile.items():
        ET.SubElement(default, name).text = value
    users.write(directory / "users.xml")
    config = directory / "config.xml"
    config.write_text(
        "<clickhouse><user_directories><users_xml><path>users.xml</path></users_xml></user_directories>"
        "<part_log><database>system</database><table>part_log</table></part_log></clickhouse>"
    )
    return config


def measure(variant: str, parts: int, events_per_part: int) -> dict[str, Any]:
    """One variant, in this process: the parts written, then every merge's peak memory."""
    profile, projection = VARIANTS[variant]
    directory = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    config = _engine_config(directory, profile)
    client = clickhouse_connect.get_client(
        interface="chdb", path=str(directory / "store"), chdb_options={"config-file": str(config)}
    )
    client.command("CREATE DATABASE IF NOT EXISTS bench")
    client.database = "bench"
    migrate(client, Settings(clickhouse_database="bench"))
    if not projection:
        client.command("ALTER TABLE bench.usage_rollup DROP PROJECTION by_bucket")
    client.command("SYSTEM STOP MERGES bench.usage_rollup")
    start_minute = int(time.time()) // 86_400 * 86_400 - 86_400  # inside every TTL
    for n in range(parts):
        batch = rollup_batch(events_per_part, n, n * events_per_part, start_minute)
        client.insert_arrow("bench.usage_rollup", batch.to_arrow("events"), settings={"insert_deduplicate": 0})
    written = client.query(
        "SELECT count(), sum(rows), sum(bytes_on_disk) FROM system.parts WHERE table = 'usage_rollup' AND active"
    ).result_rows[0]
    client.command("SYSTEM START MERGES bench.usage_rollup")
    # A background merge may take some of the parts first; OPTIMIZE then merges what is left
    # (or returns while that merge runs): again until one part remains.
    deadline = time.monotonic() + 600
    while True:
        client.command("OPTIMIZE TABLE bench.usage_rollup FINAL")
        while client.query("SELECT count() FROM system.merges WHERE table = 'usage_rollup'").result_rows[0][0]:
            time.sleep(0.2)
        active = client.query("SELECT count() FROM system.parts WHERE table = 'usage_rollup' AND active")
        if active.result_rows[0][0] == 1:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{variant}: still {active.result_rows[0][0]} parts after 10 minutes of merging")
    client.command("SYSTEM FLUSH LOGS")
    merges = client.query(
        "SELECT peak_memory_usage, duration_ms FROM system.part_log "
        "WHERE event_type = 'MergeParts' AND table = 'usage_rollup' ORDER BY peak_memory_usage DESC"
    ).result_rows
    return {
        "variant": variant,
        "profile": profile,
        "parts": int(written[0]),
        "rows": int(written[1]),
        "bytes_before": int(written[2]),
        "merges": len(merges),
        "peak": int(merges[0][0]) if merges else 0,
        "duration_ms": int(merges[0][1]) if merges else 0,
    }


def report(results: list[dict[str, Any]], command: str) -> str:
    first = results[0]
    lines = [
        f"Run {now_utc()} — `{command}` (commit {commit()}).",
        "",
        f"- Data: {first['parts']} parts written by `BatchAggregate` (one insert each), {first['rows']:,} rows, "
        f"{first['bytes_before'] / 2**20:,.1f} MiB on disk at chDB's defaults; then `OPTIMIZE TABLE … FINAL`. "
        "Peak = the largest merge's `peak_memory_usage` in `system.part_log` (memory chDB tracked for it).",
        "",
        "| variant | profile settings | merges | largest merge: peak (MiB) | its duration (s) | parts written (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        settings = ", ".join(f"`{k}` = {v}" for k, v in r["profile"].items()) or "(none)"
        lines.append(
            f"| {r['variant']} | {settings} | {r['merges']} | {r['peak'] / 2**20:,.1f} | "
            f"{r['duration_ms'] / 1000:.2f} | {r['bytes_before'] / 2**20:,.1f} |"
        )
    lines += [
        "",
        *environment_lines("chdb", "clickhouse-connect", "pyarrow"),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--events-per-part", type=int, default=200_000)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one variant, as JSON
    parser.add_argument("--no-write", action="store_true", help="do not write results.md")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.parts, args.events_per_part)))
        return 0
    results = []
    for variant in VARIANTS:
        child = [sys.executable, "-m", "bench.merge_memory", "--variant", variant]
        child += ["--parts", str(args.parts), "--events-per-part", str(args.events_per_part)]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{variant}: peak {results[-1]['peak'] / 2**20:,.1f} MiB", flush=True)
    command = f"python -m bench.merge_memory --parts {args.parts} --events-per-part {args.events_per_part}"
    body = report(results, command)
    print(body)
    if not args.no_write:
        replace_block("merge_memory", "Soak", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
