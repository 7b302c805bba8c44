"""``meter`` subcommands of the analytics: the same queries as the HTTP API, as table, JSON or CSV."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pydantic import BaseModel, ValidationError

from common.follower import TopicFollower, valid_records
from common.listen import listening_socket
from schemas.analytics import (
    BacktestKey,
    BacktestRequest,
    BacktestResult,
    BacktestScope,
    Breakdown,
    Subject,
    TopDimension,
    TopMetric,
)
from schemas.limits import LimitOverride, LimitPolicy, PolicyBook
from schemas.usage import Granularity
from worker.analytics.queries import MAX_DECISION_HISTORY, MAX_TOP_N
from worker.analytics.source import Analytics, open_analytics
from worker.cli_args import count_between, key_id, parse_duration, parse_time
from worker.refusals import QueryRefused, problems
from worker.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], int]
FORMATS = ("table", "json", "csv")


# -- output ---------------------------------------------------------------------------------

_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` safe for a terminal: control (C0, C1), bidi (U+061C, U+200E/F, U+202A-E,
    U+2066-9) and other non-printable characters escaped as ``\\xNN`` / ``\\uNNNN``, a backslash
    doubled (so an escape shown is always one).

    Stored strings may predate the contract's refusal of controls; a table never prints them raw.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, float):
        return f"{value:g}"
    return str(value.value if hasattr(value, "value") else value)


def emit(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: str,
    document: BaseModel | Sequence[BaseModel] | None = None,
    out: TextIO | None = None,
) -> None:
    """``json`` prints the whole result model (or the rows); ``table`` / ``csv`` print the rows."""
    out = out or sys.stdout
    if fmt == "json":
        if isinstance(document, BaseModel):
            out.write(document.model_dump_json() + "\n")
        elif document is not None:
            out.write(json.dumps([d.model_dump(mode="json") for d in document]) + "\n")
        else:
            out.write(json.dumps([{c: r.get(c) for c in columns} for r in rows], default=_cell) + "\n")
        return
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        return
    cells = [[printable(_cell(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _client(settings: Settings) -> Any:
    from worker.store.client import connect

    return connect(settings.clickhouse_dsn, settings.clickhouse_database)


def _source(args: argparse.Namespace, settings: Settings) -> Analytics:
    """The store, or the query API of --api / the worker holding the embedded store."""
    read: list[PolicyBook] = []

    def book() -> PolicyBook:  # read from Kafka once, when a query needs it
        if not read:
            read.append(_policy_book(settings))
        return read[0]

    return open_analytics(settings, args.api, lambda: book().resolve, book)


# -- handlers -------------------------------------------------------------------------------


def cmd_top(args: argparse.Namespace, settings: Settings) -> int:
    until = args.until or datetime.now(UTC)
    since = args.since or until - args.window
    result = _source(args, settings).top(TopDimension(args.by), TopMetric(args.metric), since, until, args.n)
    columns = [
        "rank",
        "id",
        *(["account_id"] if args.by == "key" else []),
        "requests",
        "errors",
        "auth_failures",
        "rate_limited",
    ]
    emit([e.model_dump() for e in result.entries], columns, args.format, result)
    return 0


def _series(args: argparse.Namespace, settings: Settings, subject: Subject, subject_id: str) -> int:
    from worker.analytics.queries import DEFAULT_SERIES_GROUPS

    result = _source(args, settings).series(
        subject,
        subject_id,
        Granularity(args.granularity),
        args.since,
        args.until,
        Breakdown(args.breakdown),
        DEFAULT_SERIES_GROUPS if args.top is None else args.top,
    )
    rows = [
        {
            "bucket": result.bucket_start(i),
            "group": g.group,
            "requests": g.requests[i],
            "errors": g.errors[i],
            "bytes_out": g.bytes_out[i],
        }
        for g in result.groups
        for i in range(result.buckets)
        if g.requests[i] or not args.sparse
    ]
    emit(rows, ["bucket", "group", "requests", "errors", "bytes_out"], args.format, result)
    return 0


def cmd_key_usage(args: argparse.Namespace, settings: Settings) -> int:
    return _series(args, settings, Subject.key, args.key)


def cmd_account_usage(args: argparse.Namespace, settings: Settings) -> int:
    return _series(args, settings, Subject.account, args.account)


def _answers(bootstrap: str) -> bool:
    """A quick TCP check of the first bootstrap server, so a CLI without Kafka does not hang."""
    import socket

    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _policy_book(settings: Settings) -> PolicyBook:
    """The default policy plus the overrides in force on the limits topic (if Kafka answers)."""
    import asyncio

    from worker.control_topics import current_overrides

    book = settings.policy_book()
    if not _answers(settings.kafka_bootstrap):
        log.warning("Kafka at %s does not answer; showing default limits", settings.kafka_bootstrap)
        return book
    try:
        overrides = asyncio.run(asyncio.wait_for(current_overrides(settings), 15))
    except Exception as exc:  # analytics still works without Kafka: say so, use the defaults
        log.warning("limit overrides not read from Kafka (%s); showing default limits", exc)
        return book
    for override in overrides.values():
        book.apply(override)
    return book


def cmd_key_state(args: argparse.Namespace, settings: Settings) -> int:
    state = _source(args, settings).key_state(args.key, args.history)
    if args.format == "json":
        emit([], [], "json", state)
        return 0
    windows = [w.model_dump() for w in state.windows]
    emit(windows, ["window", "start", "end", "count", "limit", "remaining", "over"], args.format)
    if args.format == "table":
        until = state.blocked_until.isoformat() if state.blocked_until else "until an operator unblocks"
        print(
            f"\nkey {printable(state.key_id)} (account {printable(state.account_id or '-')}): "
            + (
                f"BLOCKED {until}"
                if state.blocked
                else f"SHADOW BLOCK {until} (dry run: nodes serve it and count the refusals)"
                if state.shadow_blocked
                else "not blocked"
            )
        )
        print("\ndecisions, newest first:")
    rows = [d.model_dump() for d in state.history]
    emit(
        rows,
        ["version", "decided_at", "action", "shadow", "window", "count", "limit", "until", "source", "reason"],
        args.format,
    )
    return 0


def cmd_blocked(args: argparse.Namespace, settings: Settings) -> int:
    keys = _source(args, settings).blocked(args.n)
    columns = ["key_id", "shadow", "window", "count", "limit", "until", "decided_at", "source", "reason"]
    emit([k.model_dump() for k in keys], columns, args.format, keys)
    return 0


def cmd_signals(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.analytics import SignalKind

    kinds = {SignalKind(k) for k in args.kind} if args.kind else None
    report = _source(args, settings).signals(args.as_of, args.recent, args.lookback, kinds, args.key)
    rows = [{**s.model_dump(exclude={"evidence"}), "subject": s.key_id or s.client_ip} for s in report.signals]
    if args.format == "table":
        for s in report.signals:
            subject, explanation = printable(s.key_id or s.client_ip or ""), printable(s.explanation)
            print(f"[{s.severity.value:6}] {s.kind.value:18} {subject}\n         {explanation}")
        if not report.signals:
            print("no abuse signals")
        return 0
    emit(rows, ["severity", "kind", "subject", "account_id", "score", "explanation"], args.format, report)
    return 0


def _limits(policy: LimitPolicy) -> str:
    return ", ".join(
        f"{'unlimited' if v is None else f'{v:,}'}/{w}"
        for v, w in ((policy.per_minute, "min"), (policy.per_hour, "h"), (policy.per_day, "day"))
    )


def _since(text: str) -> timedelta | datetime:
    """``7d``, ``36h`` (back from --until), or an RFC 3339 time."""
    try:
        return parse_duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        return parse_time(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"not a span or a time: {text!r} (examples: 7d, 36h, 2026-11-27T00:00:00Z)"
        ) from None


def backtest_request(args: argparse.Namespace, default: LimitPolicy) -> BacktestRequest:
    """The request of ``meter limits backtest``: a limit not given is the default policy's, as with
    ``meter limits set`` (``unlimited`` drops it); ``--unlimited`` drops all three."""
    given = {"per_minute": args.per_minute, "per_hour": args.per_hour, "per_day": args.per_day}
    limits = {
        # Not given: the parser's "unset" sentinel (neither a count nor None).
        name: None if args.unlimited else value if value is None or isinstance(value, int) else getattr(default, name)
        for name, value in given.items()
    }
    scope, subject = (
        (BacktestScope.key, args.key)
        if args.key
        else (BacktestScope.account, args.account)
        if args.account
        else (BacktestScope.all, None)
    )
    try:
        return _backtest_request(limits, scope, subject, args)
    except ValidationError as exc:  # --top 5000, a key id too long, ...: one line, exit 2
        raise QueryRefused(problems(exc)) from None


def _backtest_request(
    limits: dict[str, Any], scope: BacktestScope, subject: str | None, args: argparse.Namespace
) -> BacktestRequest:
    return BacktestRequest(
        **limits,
        scope=scope,
        subject=subject,
        since=args.since if isinstance(args.since, datetime) else None,
        span=args.since if isinstance(args.since, timedelta) else None,
        until=args.until,
        top=args.top,
        windows_per_key=args.windows,
        ignore_overrides=args.ignore_overrides,
    )


_BACKTEST_KEY_COLUMNS = [
    "key_id",
    "account_id",
    "requests",
    "refused",
    "refused_minute",
    "refused_hour",
    "refused_day",
    "in_force_refused",
    "observed_refused",
    "first_refused",
    "windows_refused",
    "candidate",
    "in_force",
    "in_force_source",
]


def _key_row(k: BacktestKey) -> dict[str, Any]:
    row = k.model_dump(include=set(_BACKTEST_KEY_COLUMNS))
    kept = "" if k.candidate_applies else " (override kept)"
    return {**row, "candidate": _limits(k.candidate) + kept, "in_force": _limits(k.in_force)}


def cmd_limits_backtest(args: argparse.Namespace, settings: Settings) -> int:
    """``meter limits backtest``: a summary, the most refused keys and their most refused windows."""
    request = backtest_request(args, settings.default_policy())
    result = _source(args, settings).backtest(request)
    if args.format == "json":
        emit([], [], "json", result)
        return 0
    if args.format == "csv":
        emit([_key_row(k) for k in result.top], _BACKTEST_KEY_COLUMNS, "csv")
        return 0
    print_backtest(result)
    return 0


def print_backtest(result: BacktestResult, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    who = {
        BacktestScope.all: "all keys (as the default; keys and accounts with an override keep it)",
        BacktestScope.account: f"the keys of account {printable(result.subject or '')} "
        "(keys with their own override keep it)",
        BacktestScope.key: f"key {printable(result.subject or '')}",
    }[result.scope]
    if result.ignore_overrides:
        who = who.split(" (")[0] + " (overrides ignored)"
    span = f"{_cell(result.since)} .. {_cell(result.until)}"
    lines = [
        f"backtest of {_limits(result.policy)} on {who}",
        f"span {span} from the minute rollups (exact at minute granularity); 429s count as demand",
        f"{result.keys:,} keys, {result.requests:,} requests, of which {result.observed_refused:,} were refused "
        "(429) by the limits in force",
        *(f"note: {printable(n)}" for n in result.notes),
        "",
    ]
    out.write("\n".join(lines) + "\n")
    rows: list[dict[str, Any]] = []
    for name, outcome in (("candidate", result.candidate), ("in force", result.in_force)):
        for w in outcome.windows:
            rows.append(
                {"policy": name, "window": w.window.value, "keys": w.keys, "buckets": w.buckets, "refused": w.refused}
            )
        rows.append(
            {
                "policy": name,
                "window": "total",
                "keys": outcome.keys_refused,
                "buckets": None,
                "refused": outcome.refused,
            }
        )
    emit(rows, ["policy", "window", "keys", "buckets", "refused"], "table", out=out)
    out.write(
        f"\nkeys refused under the candidate and not under the limits in force: {result.newly_refused_keys:,}; "
        f"the reverse: {result.no_longer_refused_keys:,}\n"
    )
    if not result.top:
        out.write("\nno key would have been refused\n")
        return
    out.write("\nmost refused keys (candidate), with the same replay under the limits in force:\n")
    emit([_key_row(k) for k in result.top], _BACKTEST_KEY_COLUMNS, "table", out=out)
    windows = [{"key_id": k.key_id, **w.model_dump()} for k in result.top for w in k.windows]
    if windows:
        out.write("\ntheir most refused windows (candidate; a refusal goes to the longest window at its limit):\n")
        emit(windows, ["key_id", "window", "start", "requests", "refused"], "table", out=out)


def add_backtest_arguments(p: argparse.ArgumentParser, who: argparse._MutuallyExclusiveGroup) -> None:
    """The options of ``meter limits backtest`` on the ``limits`` parser (``who`` holds --key / --account)."""
    who.add_argument("--all", action="store_true", help="backtest: every key (the default)")
    p.add_argument(
        "--since",
        type=_since,
        help="backtest: a span back from --until (7d, 36h) or an RFC 3339 time "
        "(default: all the minute level holds, METER_TTL_MINUTE_DAYS)",
    )
    p.add_argument("--until", type=parse_time, help="backtest: RFC 3339 end, exclusive (default: now)")
    p.add_argument("--top", type=int, default=20, metavar="N", help="backtest: list the N most refused keys")
    p.add_argument(
        "--windows", type=int, default=3, metavar="N", help="backtest: list each listed key's N most refused windows"
    )
    p.add_argument(
        "--ignore-overrides",
        action="store_true",
        help="backtest: the candidate applies to every key of the scope, even keys or accounts with an override",
    )
    add_api_argument(p)


def cmd_serve_api(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from worker.analytics.api import build_query_app

    if not settings.admin_api_key.get_secret_value():
        print("meter serve-api: set METER_ADMIN_API_KEY first (every /v1 request must carry it)", file=sys.stderr)
        return 2
    book = _policy_book(settings)
    follower = TopicFollower(settings, settings.limits_topic, _applier(book), "query-api")
    app = build_query_app(settings, _client(settings), policy_for=book.resolve, policy_book=book)
    # Keep following the overrides while serving, so the key state shows the limits in force.
    app.router.on_startup.append(follower.start)
    app.router.on_shutdown.append(follower.stop)
    host, port = args.host or settings.http_host, args.port or settings.http_port
    sock = listening_socket(host, port)  # a port in use: one line from the CLI, not uvicorn's exit
    print(f"query API on http://{host}:{port}/v1 — dashboard http://{host}:{port}/dashboard", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def _applier(book: PolicyBook) -> Callable[[list[Any]], Awaitable[None]]:
    async def apply(records: list[Any]) -> None:
        for override in valid_records(records, LimitOverride):
            book.apply(override)

    return apply


def cmd_analytics_sample(args: argparse.Namespace, settings: Settings) -> int:
    from worker.analytics.sample import seed_sample
    from worker.store.migrations import migrate

    client = _client(settings)
    migrate(client, settings)
    facts = seed_sample(client, settings.clickhouse_database)
    print(f"wrote {facts.rows} rollup rows and sample decisions into {settings.clickhouse_database}")
    return 0


# -- registration ---------------------------------------------------------------------------


def _fmt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="table")
    add_api_argument(p)


def add_api_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api",
        metavar="URL",
        help="ask this query API (a worker's or `meter serve-api`'s base URL) instead of opening the store "
        "(default: METER_QUERY_API_URL; with neither, the store, or the API of the worker holding it)",
    )


def _range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=parse_time, help="RFC 3339 start (default: one span back from --until)")
    p.add_argument("--until", type=parse_time, help="RFC 3339 end, exclusive (default: now)")


# long: argparse registration of every read command: a flat list of options
def add_analytics_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``top``, ``key-usage``, ``account-usage``, ``key-state``, ``blocked``, ``signals``,
    ``serve-api`` and ``analytics-sample`` on the ``meter`` parser."""
    p = sub.add_parser("top", help="top N keys / accounts / endpoints by requests, errors, 401+403 or 429")
    p.add_argument("--by", choices=[d.value for d in TopDimension], default="key")
    p.add_argument(
        "--metric",
        choices=[m.value for m in TopMetric],
        default="requests",
        help="errors = status >= 400; auth_failures = 401 + 403; rate_limited = 429",
    )
    p.add_argument("-n", type=count_between(1, MAX_TOP_N), default=20, help=f"how many (1-{MAX_TOP_N})")
    p.add_argument(
        "--window", type=parse_duration, default=timedelta(hours=1), help="span ending at --until (default 1h)"
    )
    _range(p)
    _fmt(p)
    p.set_defaults(func=cmd_top)

    for name, target, kind, handler in (
        ("key-usage", "--key", key_id, cmd_key_usage),
        ("account-usage", "--account", str, cmd_account_usage),
    ):
        p = sub.add_parser(name, help=f"usage series of one {target[2:]}, optionally by endpoint or status class")
        p.add_argument(target, required=True, type=kind)
        p.add_argument("--granularity", choices=[g.value for g in Granularity], default="hour")
        p.add_argument("--breakdown", choices=[b.value for b in Breakdown], default="none")
        p.add_argument(
            "--top",
            type=int,
            metavar="N",
            help="with a breakdown: the N biggest groups, the rest summed as 'other' (default 10, at most 50)",
        )
        _range(p)
        p.add_argument("--sparse", action="store_true", help="omit empty buckets")
        _fmt(p)
        p.set_defaults(func=handler)

    p = sub.add_parser("key-state", help="a key's counts vs its limits, its active block and its decisions")
    p.add_argument("--key", required=True, type=key_id, help="the key id (as the nodes derive it; never the raw key)")
    p.add_argument(
        "--history",
        type=count_between(1, MAX_DECISION_HISTORY),
        default=20,
        help=f"how many decisions to show, newest first (1-{MAX_DECISION_HISTORY}; default 20)",
    )
    _fmt(p)
    p.set_defaults(func=cmd_key_state)

    p = sub.add_parser("blocked", help="keys blocked right now")
    p.add_argument(
        "-n", type=count_between(1, MAX_TOP_N), default=100, help=f"how many, newest first (1-{MAX_TOP_N}; default 100)"
    )
    _fmt(p)
    p.set_defaults(func=cmd_blocked)

    p = sub.add_parser("signals", help="abuse signals with plain-words explanations")
    p.add_argument(
        "--kind",
        action="append",
        choices=["rate_jump", "auth_failures", "rate_limited", "many_sources", "repeated_blocks", "invalid_key_storm"],
    )
    p.add_argument("--key", type=key_id, help="only this key's signals")
    p.add_argument("--as-of", type=parse_time, help="RFC 3339: look at the signals as they were then (default: now)")
    p.add_argument(
        "--recent", type=parse_duration, default=timedelta(hours=1), help="window of the rate signals (default 1h)"
    )
    p.add_argument(
        "--lookback",
        type=parse_duration,
        default=timedelta(hours=24),
        help="window of IP / block signals (default 24h)",
    )
    _fmt(p)
    p.set_defaults(func=cmd_signals)

    p = sub.add_parser("serve-api", help="serve the query API (/v1) and the dashboard (/dashboard)")
    p.add_argument("--host", help="default: METER_HTTP_HOST")
    p.add_argument("--port", type=int, help="default: METER_HTTP_PORT")
    p.set_defaults(func=cmd_serve_api)

    p = sub.add_parser("analytics-sample", help="write a small sample data set (to try the dashboard)")
    p.set_defaults(func=cmd_analytics_sample)
