"""``meter``: the command line of the usage meter. Builds settings once and passes them down."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from pydantic import ValidationError

from schemas.usage import Granularity, UsagePoint
from worker.logs import setup_logging
from worker.settings import Settings

Command = Callable[[argparse.Namespace, Settings], int]


def parse_time(text: str) -> datetime:
    """RFC 3339 (``2026-11-27T12:00:00Z``); a value without offset is refused, not guessed."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r} (example: 2026-11-27T12:00:00Z)") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time needs an offset or Z: {text!r}")
    return value.astimezone(UTC)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import WorkerRuntime

    runtime = WorkerRuntime(settings)
    asyncio.run(runtime.app.run())
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from worker.store.client import connect, redact_dsn
    from worker.store.migrations import migrate

    client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    applied = migrate(client, settings)
    where = f"{redact_dsn(settings.clickhouse_dsn)} / {settings.clickhouse_database}"
    if applied:
        print(
            f"applied {len(applied)} migration(s) on {where}: "
            + ", ".join(f"{m.version:03d}_{m.name}" for m in applied)
        )
    else:
        print(f"schema up to date on {where}")
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from worker.topics import ensure_topics, topic_specs

    created = asyncio.run(ensure_topics(settings))
    for spec in topic_specs(settings):
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name:40} {spec.partitions:3d} partitions  {state}")
    return 0


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from worker.store.client import connect
    from worker.store.usage import default_range, usage_series

    granularity = Granularity(args.granularity)
    try:
        since, until = default_range(granularity, args.since, args.until)
    except ValueError as exc:
        print(f"meter usage: {exc}", file=sys.stderr)
        return 2
    client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    points = usage_series(
        client, settings.clickhouse_database, args.key, granularity, since, until, fill=not args.sparse
    )
    print_points(points, args.format)
    return 0


def print_points(points: Sequence[UsagePoint], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([p.model_dump(mode="json") for p in points]))
        return
    print(f"{'bucket (UTC)':25} {'requests':>10} {'errors':>8} {'bytes_out':>12}")
    for p in points:
        print(f"{p.bucket.strftime('%Y-%m-%dT%H:%M:%SZ'):25} {p.requests:>10} {p.errors:>8} {p.bytes_out:>12}")
    print(f"{'total':25} {sum(p.requests for p in points):>10} {sum(p.errors for p in points):>8}")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker.demo import run_pipeline_demo

    asyncio.run(run_pipeline_demo(settings, args.events, args.keys))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter",
        description="Usage meter for a multi-node HTTP API. Settings come from METER_* environment "
        "variables (or .env): METER_KAFKA_BOOTSTRAP, METER_CLICKHOUSE_DSN, METER_EVENTS_TOPIC, ...",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: METER_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run a metering worker (consume events, write rollups, evaluate limits)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="create or upgrade the ClickHouse schema (idempotent)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("topics", help="create the Kafka topics (events, decisions compacted, DLQ)")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("usage", help="print the usage series of one key")
    p.add_argument("--key", required=True, help="the key id (as shown by the API node, never the raw key)")
    p.add_argument("--granularity", choices=[g.value for g in Granularity], default="minute")
    p.add_argument("--since", type=parse_time, help="RFC 3339 start (default: one window back from --until)")
    p.add_argument("--until", type=parse_time, help="RFC 3339 end, exclusive (default: now)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--sparse", action="store_true", help="omit empty buckets instead of printing zeros")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("demo", help="local demo: run a worker, simulate API traffic, print usage read back")
    p.add_argument("--events", type=int, default=5_000, help="how many request events to simulate")
    p.add_argument("--keys", type=int, default=20, help="over how many API keys")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"meter: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or settings.log_level, settings.log_json)
    func: Command = args.func
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
