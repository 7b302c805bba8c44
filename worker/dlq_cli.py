"""``meter dlq show`` and ``meter dlq replay``: the dead-letter topic for operators."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from worker.analytics.cli import printable
from worker.cli_args import count_between, parse_duration
from worker.ingest.replay import describe, read_dead_letters, replay_dead_letters
from worker.settings import Settings


def _since(args: argparse.Namespace) -> datetime | None:
    return datetime.now(UTC) - args.since if args.since else None


def cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    letters = asyncio.run(read_dead_letters(settings, args.reason, _since(args), keep=args.limit))
    latest = list(letters.chosen)
    if args.format == "json":
        print(json.dumps([describe(letter) for letter in latest]))
        return 0
    print(
        f"{settings.dlq_topic}: {letters.total} dead letters"
        + (f" ({letters.copies} repeated copies collapsed)" if letters.copies else "")
        + (f", {letters.selected} selected" if letters.selected != letters.total else "")
    )
    for reason, n in letters.by_reason.most_common():
        print(f"  {reason:16} {n}")
    if latest:
        print(f"\nlatest {len(latest)}:")
        for letter in latest:
            row = describe(letter)
            flag = " [truncated]" if letter.truncated else ""
            print(f"{printable(letter.rejected_at[:19])}  {printable(letter.id)}  {printable(letter.reason)}{flag}")
            print(f"    {printable(str(row['detail']))[:160]}")
            print(f"    {printable(str(row['original']))[:160]}")
    return 0


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    letters, report = asyncio.run(
        replay_dead_letters(settings, args.reason, _since(args), time.time(), dry_run=args.dry_run)
    )
    done = f"would re-publish {report.passed}" if args.dry_run else f"re-published {report.republished}"
    print(
        f"{letters.selected} dead letters with reason {args.reason}: {done} to {settings.events_topic}"
        + (f" ({letters.copies} repeated copies collapsed first)" if letters.copies else "")
    )
    for reason, n in report.still_rejected.most_common():
        print(f"  still rejected as {reason}: {n} (left in the DLQ, not re-published)")
    if report.truncated:
        print(f"  truncated originals: {report.truncated} (cannot be replayed; see their size and SHA-256)")
    for error, n in report.failed.most_common():
        print(f"  NOT delivered, Kafka refused them: {n} ({error}); they stay in the DLQ, replay again")
    return 1 if report.failed else 0


def add_dlq_commands(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="show or replay the dead-letter topic (rejected events and why)")
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")

    p = actions.add_parser("show", help="count dead letters by reason and print the latest")
    p.add_argument("--reason", help="only this reason (e.g. schema_violation, ts_in_future)")
    p.add_argument("--since", type=parse_duration, help="only letters rejected in this span back from now, e.g. 7d")
    p.add_argument(
        "--limit", type=count_between(0, 100_000), default=10, help="how many of the latest to print (default 10)"
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_dlq_show)

    p = actions.add_parser(
        "replay",
        help="validate the originals again and re-publish those that pass to the events topic "
        "(with their original key; events already counted are dropped by the worker's dedup)",
    )
    p.add_argument("--reason", required=True, help="replay the letters of this reason only")
    p.add_argument("--since", type=parse_duration, help="only letters rejected in this span back from now")
    p.add_argument("--dry-run", action="store_true", help="say what would be re-published, publish nothing")
    p.set_defaults(func=cmd_dlq_replay)
