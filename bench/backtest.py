"""Backtest benchmark: a candidate policy replayed on 1,000,000 keys x 7 days of minute rollups.

    .venv/bin/python -m bench.backtest [--keys 1000000] [--events 7000000] [--burst-keys 1000] [--runs 7]
                                       [--dir DIR] [--reuse] [--no-write]

1. a fresh chDB directory (or ``--dir``), migrated with the default retention (minute rows 7 days);
2. seed the minute level only (the backtest reads nothing else; the table is ordered by level
   first, so the other levels would not be read either), by ``INSERT ... SELECT ... FROM numbers()``:
   - ``--events`` requests over the last 7 days from ``--keys`` keys, popularity a power law
     (P(rank k) ~ k^-0.7: a few busy keys, a long tail making a request every few days), 1-2
     endpoints per key, ~3% 404; one insert per day, grouped per (key, minute, endpoint, status)
     as the ingest writes them;
   - ``--burst-keys`` keys over the limits: 70% spike (30 random minutes a day of 30-179
     requests), 20% office hours (12 a minute 08:00-20:00 UTC: 720 an hour, 8,640 a day), 10%
     flat out (20-29 a minute around the clock); what a 100/min limiter refused stored as 429s;
3. a policy book like a production one: the default 100/1,000/5,000, 200 key overrides and 20
   account overrides (one unlimited);
4. time ``worker.analytics.backtest.backtest`` (SQL + result models, top 20 keys with 10 windows
   each), candidate 50/min, 600/h, 5,000/day over the whole 7 days: all keys, one account, one key,
   and all keys without overrides (the keys' accounts then are not read); wall and CPU time of
   this process (chDB runs in it), the load average before and after (the machine is shared);
5. print and write a "## Backtest" block to ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import machine, now_utc, replace_block, versions
from schemas.analytics import BacktestRequest, BacktestResult, BacktestScope
from schemas.limits import LimitPolicy, PolicyBook
from worker.analytics.backtest import backtest
from worker.analytics.queries import utc
from worker.settings import Settings
from worker.store.client import connect
from worker.store.migrations import migrate
from worker.store.rollup import rollup_table

DAYS = 7
CANDIDATE = LimitPolicy(per_minute=50, per_hour=600, per_day=5_000)

_COLUMNS = (
    "level, key_id, bucket, endpoint, status, node_id, client_ip, account_id, requests, bytes_out, latency_ms_sum"
)

# One simulated request per number, grouped per (key, minute, endpoint, status) as the ingest writes.
_BACKGROUND = f"""
INSERT INTO {{table}} ({_COLUMNS})
SELECT 'minute', key_id, toStartOfMinute(ts) AS b, endpoint, status, '', '', account_id, count(), count() * 512,
       count() * 25.0
FROM (
    SELECT
        toUInt32(least(toFloat64({{keys:UInt32}} - 1),
                       floor({{keys:UInt32}} * pow(cityHash64(number, 1) / 18446744073709551616.0, 1 / 0.3)))) AS k,
        concat('cf_liv_', lower(hex(cityHash64(k, 7)))) AS key_id,
        concat('acct-', toString(intDiv(k, 10))) AS account_id,
        toDateTime({{start:UInt32}} + cityHash64(number, 2) % 86400, 'UTC') AS ts,
        ['/v0/payments', '/v0/rates', '/v0/wallets'][1 + (k + if(cityHash64(number, 3) % 10 = 0, 1, 0)) % 3]
            AS endpoint,
        if(cityHash64(number, 4) % 100 < 97, 200, 404) AS status
    FROM numbers({{first:UInt64}}, {{count:UInt64}})
)
WHERE ts < {{end:UInt32}}
GROUP BY key_id, b, endpoint, status, account_id
"""

# Burst key b: kind by b % 10 (0-6 spikes, 7-8 office hours, 9 flat out); per (key, minute) a count n,
# stored as min(n, 100) answered and the rest refused (429), as a 100/min limiter would have.
_BURSTS = f"""
INSERT INTO {{table}} ({_COLUMNS})
SELECT 'minute', concat('cf_liv_burst_', leftPad(toString(b), 6, '0')), bucket, '/v0/payments', st.1, '', '',
       concat('acct-burst-', toString(b % 20)), st.2, st.2 * 512, st.2 * 25.0
FROM (
    SELECT b, bucket, n FROM (
        -- spikes: 30 a day per key, at random minutes
        SELECT intDiv(number, 30 * {{days:UInt32}}) AS b,
               toDateTime({{start:UInt32}} + intDiv(number % (30 * {{days:UInt32}}), 30) * 86400
                          + (cityHash64(number, 11) % 1440) * 60, 'UTC') AS bucket,
               30 + cityHash64(number, 12) % 150 AS n
        FROM numbers({{spikes:UInt64}}) WHERE b % 10 < 7
    )
    UNION ALL
    -- office hours: 08:00-20:00 UTC, 12 a minute (keys 7 and 8 of every ten)
    SELECT intDiv(number, 1440 * {{days:UInt32}}) * 10 + 7 + intDiv(number, 720 * {{days:UInt32}}) % 2,
           toDateTime({{start:UInt32}} + intDiv(number % (720 * {{days:UInt32}}), 720) * 86400
                      + (480 + number % 720) * 60, 'UTC'), 12
    FROM numbers({{office:UInt64}})
    UNION ALL
    -- flat out: every minute, 20-29
    SELECT intDiv(number, 1440 * {{days:UInt32}}) * 10 + 9,
           toDateTime({{start:UInt32}} + (number % (1440 * {{days:UInt32}})) * 60, 'UTC'),
           20 + cityHash64(number, 13) % 10
    FROM numbers({{flat:UInt64}})
)
ARRAY JOIN [(200, least(n, 100)), (429, n - least(n, 100))] AS st
WHERE st.2 > 0 AND bucket >= {{first_minute:UInt32}} AND bucket < {{end:UInt32}}
"""


def seed(client: Any, database: str, keys: int, events: int, burst_keys: int, now: datetime) -> float:
    table = rollup_table(database)
    end = int(now.timestamp()) // 60 * 60
    first_minute = end - DAYS * 86400 + 60  # the oldest minute stays inside the 7 days the level keeps
    start = first_minute // 86400 * 86400
    per_day = events // DAYS
    t0 = time.perf_counter()
    for day in range(DAYS + 1):
        params = {
            "keys": keys,
            "start": max(first_minute, start + day * 86400),
            "first": day * per_day,
            "count": per_day if day < DAYS else events - DAYS * per_day,
            "end": end,
        }
        if params["start"] < end:
            client.command(_BACKGROUND.replace("{table}", table), parameters=params)
    groups = burst_keys // 10
    client.command(
        _BURSTS.replace("{table}", table),
        parameters={
            "start": start,
            "days": DAYS + 1,
            "spikes": groups * 10 * 30 * (DAYS + 1),
            "office": groups * 2 * 720 * (DAYS + 1),
            "flat": groups * 1440 * (DAYS + 1),
            "first_minute": first_minute,
            "end": end,
        },
    )
    return time.perf_counter() - t0


def describe(client: Any, database: str) -> dict[str, Any]:
    row = client.query(
        f"SELECT count(), uniqExact(key_id), sum(requests), sumIf(requests, status = 429), "
        f"uniqExact(key_id, bucket) FROM {rollup_table(database)} WHERE level = 'minute'"
    ).result_rows[0]
    parts = client.query(
        "SELECT count(), formatReadableSize(sum(bytes_on_disk)) FROM system.parts "
        "WHERE database = {db:String} AND table = 'usage_rollup' AND active",
        parameters={"db": database},
    ).result_rows[0]
    rows, keys, requests, refused, key_minutes = (int(v) for v in row)
    return {
        "rows": rows,
        "keys": keys,
        "requests": requests,
        "refused": refused,
        "key_minutes": key_minutes,
        "parts": int(parts[0]),
        "disk": str(parts[1]),
    }


def policy_book(burst_keys: int) -> PolicyBook:
    """Default 100/1,000/5,000; 200 key overrides (half of them on burst keys, some tighter, some
    looser), 20 account overrides (acct-burst-3 unlimited: an internal account)."""
    book = PolicyBook(LimitPolicy())
    for i in range(200):
        key = f"cf_liv_burst_{i * 10:06d}" if i < 100 else f"cf_liv_trial_{i:04d}"
        book.by_key[key] = LimitPolicy(per_minute=20 + i % 5 * 40, per_hour=500 + i % 3 * 1000, per_day=None)
    for i in range(20):
        account = f"acct-burst-{i}" if i < 5 else f"acct-{i * 1000}"
        book.by_account[account] = (
            LimitPolicy.unlimited() if i == 3 else LimitPolicy(per_minute=300, per_hour=10_000, per_day=50_000)
        )
    return book


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], BacktestResult], runs: int) -> tuple[dict[str, float], BacktestResult]:
    result = fn()  # warm-up (and the answer shown)
    walls, cpus = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), cpu_seconds()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(cpu_seconds() - c)
    return {
        "median": statistics.median(walls),
        "min": min(walls),
        "max": max(walls),
        "cpu": statistics.median(cpus),
    }, result


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker/analytics/backtest.py", "bench/backtest.py"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + (" (backtest files modified)" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=7_000_000, help="background requests over the 7 days")
    parser.add_argument("--burst-keys", type=int, default=1_000, help="keys over the limits (multiple of 10)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", type=Path, help="chDB directory (default: a fresh temp dir)")
    parser.add_argument("--reuse", action="store_true", help="--dir holds a seeded run: time only")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results.md")
    args = parser.parse_args()

    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-backtest-"))
    settings = Settings(clickhouse_dsn=f"chdb://{directory}", clickhouse_database="bench")
    client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    migrate(client, settings)
    db = settings.clickhouse_database
    if args.reuse:
        last = client.query(f"SELECT max(bucket) FROM {rollup_table(db)} WHERE level = 'minute'").result_rows[0][0]
        now = utc(last) + timedelta(seconds=59)
        seconds = float("nan")
    else:
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        print(f"seeding {args.keys:,} keys, {args.events:,} requests + {args.burst_keys:,} burst keys ...", flush=True)
        seconds = seed(client, db, args.keys, args.events, args.burst_keys, now)
    info = describe(client, db)
    print(
        f"seeded in {seconds:.1f} s: {info['rows']:,} minute rows ({info['key_minutes']:,} key-minutes), "
        f"{info['keys']:,} keys, {info['requests']:,} requests ({info['refused']:,} stored as 429), "
        f"{info['parts']} parts, {info['disk']}",
        flush=True,
    )

    book = policy_book(args.burst_keys)
    bare = PolicyBook(LimitPolicy())
    span = timedelta(days=DAYS)
    base = BacktestRequest(
        per_minute=CANDIDATE.per_minute, per_hour=CANDIDATE.per_hour, per_day=CANDIDATE.per_day, span=span
    )
    key = "cf_liv_burst_000009"  # flat out
    cases: dict[str, tuple[BacktestRequest, PolicyBook]] = {
        "all keys, 7 days, 220 overrides in force": (base, book),
        "all keys, 7 days, no overrides (accounts not read)": (base, bare),
        "one account (acct-burst-9), 7 days": (
            base.model_copy(update={"scope": BacktestScope.account, "subject": "acct-burst-9"}),
            book,
        ),
        f"one key ({key}, flat out), 7 days": (
            base.model_copy(update={"scope": BacktestScope.key, "subject": key}),
            book,
        ),
    }
    load_before = os.getloadavg()
    results: dict[str, dict[str, float]] = {}
    answers: dict[str, BacktestResult] = {}
    for name, (request, policies) in cases.items():

        def run(request: BacktestRequest = request, policies: PolicyBook = policies) -> BacktestResult:
            return backtest(client, db, request, policies, settings.ttl_minute_days, now=now)

        results[name], answers[name] = timed(run, args.runs)
        r = results[name]
        print(
            f"{r['median']:7.2f} s median {r['min']:7.2f} min {r['max']:7.2f} max {r['cpu']:7.2f} s CPU  {name}",
            flush=True,
        )
    load_after = os.getloadavg()
    main_answer = answers["all keys, 7 days, 220 overrides in force"]
    c, f = main_answer.candidate, main_answer.in_force
    summary = (
        f"Answer (all keys): {main_answer.keys:,} keys, {main_answer.requests:,} requests; candidate refuses "
        f"{c.refused:,} requests of {c.keys_refused:,} keys (minute {c.windows[0].refused:,}, hour "
        f"{c.windows[1].refused:,}, day {c.windows[2].refused:,}); the policy in force {f.refused:,} of "
        f"{f.keys_refused:,} keys; stored 429s {main_answer.observed_refused:,}."
    )
    print(summary)
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")

    if args.no_write:
        return
    m = machine()
    v = versions("chdb", "clickhouse-connect", "pydantic")
    command = "python -m bench.backtest " + " ".join(sys.argv[1:])
    seed_note = f"seeded in {seconds:.0f} s" if not args.reuse else "seed of an earlier run, --reuse"
    lines = [
        f"Run {now_utc()} on {m['cpu']} ({m['usable cpus']} usable CPUs, {m['ram']}), Python {m['python']}, "
        f"chdb {v['chdb']}, clickhouse-connect {v['clickhouse-connect']}, commit {commit()}. "
        f"Command: `{command.strip()}`.",
        "",
        f"Load average while timing (1/5/15 min): before {load_before[0]:.2f} / {load_before[1]:.2f} / "
        f"{load_before[2]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} "
        "(a 2-core machine shared with other engineers' runs: wall times vary with it; the CPU column is "
        "this process's own user+system time, chDB included).",
        "",
        f"Data ({seed_note}): the minute level only, {info['rows']:,} rows = {info['key_minutes']:,} "
        f"(key, minute) pairs of {info['keys']:,} keys over {DAYS} days, {info['requests']:,} requests "
        f"({info['refused']:,} stored as 429; {info['parts']} active parts, {info['disk']} on disk): "
        f"{args.events:,} power-law requests over {args.keys:,} keys plus {args.burst_keys:,} keys over the "
        "limits (spikes, office hours, flat out). Policy in force: default 100/min, 1,000/h, 5,000/day with "
        "200 key and 20 account overrides. Candidate: 50/min, 600/h, 5,000/day over the whole 7 days.",
        "",
        f"Each case: {args.runs} timed runs after 1 warm-up, through `worker.analytics.backtest.backtest` "
        "(the function the API and the CLI call: SQL, then the top 20 keys' accounts and 10 windows each, "
        "result models).",
        "",
        "| backtest | median s | min s | max s | CPU s (median) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {r['cpu']:.2f} |")
    lines += ["", summary]
    replace_block("backtest", "Backtest", "\n".join(lines))
    print("written to bench/results.md (## Backtest)")


if __name__ == "__main__":
    main()
