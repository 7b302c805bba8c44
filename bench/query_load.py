"""Ingest while the worker answers queries: the embedded default's one process doing both jobs.

    .venv/bin/python -m bench.query_load [--events 500000] [--keys 50000]

Two drains of the same pre-generated events (each on its own fresh topic and chDB directory),
by the worker of ``bench.ingest`` with its query API on (admin key set):

1. quiet: nobody asks anything;
2. loaded: another process (an HTTP client, as a browser or a script would be) refreshes the
   dashboard every second (the four requests its overview makes: traffic, top keys, blocked,
   signals) and calls ``/v1/signals`` in a loop on a second connection, for the whole drain.

Prints both ingest rates, the slowdown, and the load's request counts and latencies, and
writes them to ``bench/results.md`` ("## Ingest under query load") unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from bench.common import machine, now_utc, replace_block, run_topics, versions
from bench.ingest import Drain, delete_topics, drain_worker, fmt_rate, generate, produce
from worker.settings import Settings
from worker.topics import ensure_topics

DASHBOARD = [
    "/v1/traffic?granularity=hour&breakdown=status_class",
    "/v1/top?dimension=key&metric=requests&n=10&window=1h",
    "/v1/blocked",
    "/v1/signals?recent=1h",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _client_loop(base: str, key: str, seconds: float, stopped: threading.Event) -> dict[str, Any]:
    """The query load (run in its own process): the dashboard each second + signals in a loop,
    until ``stopped`` (stdin closed by the bench) or ``seconds`` have passed."""
    latencies: dict[str, list[float]] = {"dashboard": [], "signals": []}
    errors = 0
    deadline = time.monotonic() + seconds

    def going() -> bool:
        return time.monotonic() < deadline and not stopped.is_set()

    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=30) as http:

        async def timed(kind: str, paths: list[str]) -> None:
            nonlocal errors
            started = time.perf_counter()
            answers = await asyncio.gather(*(http.get(p) for p in paths), return_exceptions=True)
            if any(isinstance(a, httpx.ConnectError) for a in answers):
                stopped.set()  # the drain is over and the worker's listener with it
                return
            failed = [a if isinstance(a, BaseException) else a.status_code for a in answers]
            failed = [f for f in failed if f != 200]
            if failed:
                errors += 1
                if errors <= 3:
                    print(f"query failed: {failed[0]!r}", file=sys.stderr)
            latencies[kind].append((time.perf_counter() - started) * 1000)

        async def dashboard() -> None:
            while going():
                tick = time.monotonic()
                await timed("dashboard", DASHBOARD)
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

        async def signals() -> None:
            while going():
                await timed("signals", ["/v1/signals"])

        while going():  # the worker's listener comes up with its lifespan: wait for it
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health/live")).status_code == 200:
                    break
            await asyncio.sleep(0.05)
        await asyncio.gather(dashboard(), signals())
    return {"latencies": latencies, "errors": errors}


def _start_load(base: str, key: str, seconds: float) -> subprocess.Popen[str]:
    """The load in its own process; the admin key goes on stdin (argv is visible in ps), and
    closing stdin stops it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.query_load", "--client", base, "--seconds", str(seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(key + "\n")
    proc.stdin.flush()
    return proc


def _stop_load(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)  # closes stdin: the client stops and reports
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def _drain(settings: Settings, args: argparse.Namespace, loaded: bool) -> tuple[Drain, dict[str, Any] | None]:
    run = uuid.uuid4().hex[:8]
    topics = run_topics(f"bench.ql.{run}")
    s = settings.model_copy(
        update={
            **topics,
            "consumer_group": f"bench-ql-{run}",
            # chDB is one data directory per process: one directory, a database per drain
            "clickhouse_database": f"bench_{run}",
            "http_port": _free_port(),
        }
    )
    names = list(topics.values())
    try:
        await ensure_topics(s)
        pre = generate(args.events, args.keys, s.events_partitions, args.seed, time.time())
        await produce(s, s.events_topic, pre)
        pre.partitions.clear()
        load: subprocess.Popen[str] | None = None
        if loaded:
            load = _start_load(f"http://127.0.0.1:{s.http_port}", s.admin_api_key.get_secret_value(), args.load_seconds)
        drain = await drain_worker(s, args.events, "none", "worker")
        result = _stop_load(load) if load is not None else None
        return drain, result
    finally:
        await delete_topics(s, names)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"{len(values)} calls, median {statistics.median(values):.0f} ms, p95 {p95:.0f} ms"


async def main_async(args: argparse.Namespace) -> int:
    base = Settings()
    tmp = Path(tempfile.mkdtemp(prefix="bench-query-load-"))
    settings = base.model_copy(
        update={
            "kafka_bootstrap": args.bootstrap or base.kafka_bootstrap,
            "clickhouse_dsn": f"chdb://{tmp}",
            "admin_api_key": SecretStr(secrets.token_urlsafe(32)),
        }
    )
    try:
        return await _compare(settings, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _compare(settings: Settings, args: argparse.Namespace) -> int:
    quiet, _ = await _drain(settings, args, loaded=False)
    print(f"quiet:  {quiet.records:,} in {quiet.seconds:.2f}s = {fmt_rate(quiet.rate)} events/s", flush=True)
    loaded, load = await _drain(settings, args, loaded=True)
    assert load is not None
    print(f"loaded: {loaded.records:,} in {loaded.seconds:.2f}s = {fmt_rate(loaded.rate)} events/s", flush=True)
    slowdown = 1 - loaded.rate / quiet.rate
    lat = load["latencies"]
    print(f"slowdown {slowdown:.0%}; dashboard refreshes: {_ms(lat['dashboard'])}; /v1/signals: {_ms(lat['signals'])}")
    if load["errors"]:
        print(f"query errors: {load['errors']}")
    if not args.no_write:
        m, v = machine(), versions("aiokafka", "faststream", "chdb", "clickhouse-connect", "fastapi", "uvicorn")
        body = "\n".join(
            [
                f"Run {now_utc()} — `python -m bench.query_load --events {args.events} --keys {args.keys}`",
                "",
                "| | events | seconds | events/s |",
                "| --- | ---: | ---: | ---: |",
                f"| worker, no queries | {quiet.records:,} | {quiet.seconds:.2f} | {fmt_rate(quiet.rate)} |",
                f"| worker, dashboard every 1 s + /v1/signals in a loop | {loaded.records:,} | "
                f"{loaded.seconds:.2f} | {fmt_rate(loaded.rate)} |",
                "",
                f"**Ingest slowdown under query load: {slowdown:.0%}** (same events, fresh topic and store each).",
                "",
                f"- Query load, from another process over HTTP on the worker's listener: dashboard refresh "
                f"(4 requests in parallel) {_ms(lat['dashboard'])}; /v1/signals {_ms(lat['signals'])}; "
                f"{load['errors']} failed.",
                f"- The store grows during the drain (0 to {args.events:,} events over {args.keys:,} keys), "
                "so the queries get heavier as it runs.",
                f"- Machine: {m['nproc']} CPUs ({m['usable cpus']} usable), {m['cpu']}, {m['ram']} RAM, {m['os']}, "
                f"Python {m['python']}; Kafka broker on the same machine; commit {_commit()}.",
                "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
            ]
        )
        replace_block("query-load", "Ingest under query load", body)
        print("results written to bench/results.md (## Ingest under query load)")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--keys", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--load-seconds", type=float, default=600.0, help="upper bound of the load (stopped at drain end)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the query load against this URL
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        key = sys.stdin.readline().strip()
        stopped = threading.Event()

        def stop_at_end_of_input() -> None:
            sys.stdin.read()  # the parent closes our stdin to stop us
            stopped.set()

        threading.Thread(target=stop_at_end_of_input, daemon=True).start()
        print(json.dumps(asyncio.run(_client_loop(args.client, key, args.seconds, stopped))), flush=True)
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
