"""``meter``: the command line of the usage meter. Builds settings once and passes them down."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, get_args

from pydantic import ValidationError

from node.settings import LogLevel
from schemas.limits import ROUTE_NAME_PATTERN, LimitOverride, LimitPolicy, OverrideScope
from schemas.usage import Granularity, UsagePoint
from worker.analytics.cli import (
    add_analytics_commands,
    add_api_argument,
    add_backtest_arguments,
    cmd_limits_backtest,
    printable,
)
from worker.cli_args import count_between, describe_subcommands, key_id, parse_duration, parse_time, seconds_between
from worker.cli_errors import one_line, quiet_client_logs
from worker.dlq_cli import add_dlq_commands
from worker.kafka_acls import Role
from worker.logs import setup_logging
from worker.settings import Settings

Command = Callable[[argparse.Namespace, Settings], int]


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import WorkerRuntime

    runtime = WorkerRuntime(settings)
    asyncio.run(runtime.app.run())
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from worker.dsn import redact_dsn
    from worker.store.client import connect
    from worker.store.migrations import migrate
    from worker.store.migrations import release as release_migration_lock
    from worker.store.retention import apply_retention, ttl_of

    client = connect(settings.clickhouse_dsn, settings.clickhouse_database)
    if args.release_lock:
        release_migration_lock(client, settings)
        print(f"released the migration lock on {redact_dsn(settings.clickhouse_dsn)} / {settings.clickhouse_database}")
        return 0
    applied = migrate(client, settings)
    retention = apply_retention(client, settings)
    where = f"{redact_dsn(settings.clickhouse_dsn)} / {settings.clickhouse_database}"
    if applied:
        print(
            f"applied {len(applied)} migration(s) on {where}: "
            + ", ".join(f"{m.version:03d}_{m.name}" for m in applied)
        )
    else:
        print(f"schema up to date on {where}")
    for table in retention:
        print(
            f"retention of {table} set from the settings (stored parts follow as they merge): {ttl_of(table, settings)}"
        )
    return 0


def cmd_kafka_acls(args: argparse.Namespace, settings: Settings) -> int:
    from common.kafka_clients import describe
    from worker.kafka_acls import apply_acls, default_principal, kafka_acls_commands, role_acls

    roles = [Role(args.role)] if args.role else list(Role)
    if args.principal and len(roles) != 1:
        print("meter kafka-acls: --principal needs --role", file=sys.stderr)
        return 2
    for role in roles:
        principal = args.principal or default_principal(role)
        acls = role_acls(role, settings)
        if args.apply:
            count = asyncio.run(apply_acls(settings, principal, acls))
            print(f"{role.value:9} {principal}: {count} ACL(s) applied on {describe(settings)}")
            continue
        print(f"# {role.value} ({principal}): " + ("no Kafka access" if not acls else f"{len(acls)} ACL(s)"))
        for line in kafka_acls_commands(principal, acls, settings.kafka_bootstrap):
            print(line)
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from worker.topics import ensure_topics, topic_specs

    created = asyncio.run(ensure_topics(settings))
    for spec in topic_specs(settings):
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name:40} {spec.partitions:3d} partitions  {state}")
    return 0


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.analytics import Breakdown, Subject
    from worker.analytics.queries import points_of
    from worker.analytics.source import open_analytics

    source = open_analytics(settings, args.api)
    # The range is checked (order, size, 1970..2106) before anything is read.
    series = source.series(
        Subject.key, args.key, Granularity(args.granularity), args.since, args.until, Breakdown.none, 1
    )
    print_points(points_of(series, args.sparse), args.format)
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
    from worker.demo import run_live_demo

    return asyncio.run(run_live_demo(settings, args.duration, args.nodes, args.base_port, args.dashboard_port))


def cmd_node(args: argparse.Namespace, settings: Settings) -> int:
    from node.demo_api import run_node

    seed = settings.demo_seed.get_secret_value()
    if not settings.node_secret.get_secret_value() or not seed:
        print("meter node: set METER_NODE_SECRET (same on every node) and METER_DEMO_SEED", file=sys.stderr)
        return 2
    asyncio.run(run_node(settings, args.port, demo_seed=seed, extra_keys=args.extra_keys, host=args.host))
    return 0


def cmd_notify(args: argparse.Namespace, settings: Settings) -> int:
    from worker.notify.deliver import run_deliverer

    if not settings.notify_webhook_urls:
        print("meter notify: set METER_NOTIFY_WEBHOOK_URLS (and METER_NOTIFY_WEBHOOK_SECRET)", file=sys.stderr)
        return 2
    asyncio.run(run_deliverer(settings))
    return 0


def route_name(text: str) -> str:
    """A route limit's name as the nodes' route configuration gives it."""
    if not re.fullmatch(ROUTE_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(f"not a route name: {text!r} (lower case letters, digits, '_', '.', '-')")
    return text


def parse_limit(text: str) -> int | None:
    """A non-negative count, or ``none`` / ``unlimited``."""
    if text.lower() in ("none", "unlimited"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a limit: {text!r} (a whole number, or 'unlimited')") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"limit must be >= 0: {text!r}")
    return value


def cmd_block(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.decisions import DecisionAction
    from worker.limits.control import manual_decision

    until = args.until or (datetime.now(UTC) + args.for_ if args.for_ else None)
    try:
        d = asyncio.run(manual_decision(settings, args.key, DecisionAction.block, until, args.reason))
    except ValueError as exc:
        print(f"meter block: {exc}", file=sys.stderr)
        return 2
    print(f"blocked {d.key_id} until {d.until.isoformat() if d.until else 'an explicit unblock'} (version {d.version})")
    return 0


def cmd_unblock(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.decisions import DecisionAction
    from worker.limits.control import manual_decision

    d = asyncio.run(manual_decision(settings, args.key, DecisionAction.unblock, None, args.reason))
    print(f"unblocked {d.key_id} (version {d.version}); limits apply again from the next window")
    return 0


def cmd_why(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from common.retry import cancel_all_and_wait
    from worker.control_topics import current_overrides, latest_allowances, latest_decisions
    from worker.limits.explain import explain

    async def gather() -> list[Any]:
        reads = [
            asyncio.create_task(read(settings)) for read in (current_overrides, latest_decisions, latest_allowances)
        ]
        try:
            return await asyncio.gather(*reads)
        finally:
            # One read failed (a missing topic): stop every other one here, not by asyncio.run's
            # single cancel at exit, which a read can lose (see cancel_and_wait; seen in CI:
            # `meter why` never returned).
            await cancel_all_and_wait(*reads)

    overrides, decisions, allowances = asyncio.run(gather())
    book = settings.policy_book()
    for override in overrides.values():
        book.apply(override)
    account = args.account or ""
    lines = explain(
        args.key,
        book.resolve(args.key, account),
        book.source(args.key, account),
        decisions.get(args.key),
        allowances.get(args.key),
        time.time(),
    )
    print("\n".join(printable(line) for line in lines))
    return 0


def _subject(args: argparse.Namespace) -> tuple[OverrideScope, str]:
    return (OverrideScope.key, args.key) if args.key else (OverrideScope.account, args.account)


def _show_limits(args: argparse.Namespace, settings: Settings, overrides: dict[str, LimitOverride]) -> int:
    rows = [("default", "*", settings.default_policy(), "")]
    rows += [("route", f"*@{r}", p, "METER_ROUTE_LIMITS") for r, p in settings.route_policies().items()]
    rows += [
        (o.scope.value, f"{o.subject}@{o.route}" if o.route else o.subject, o.policy, o.note)
        for o in overrides.values()
        if o.policy is not None
    ]
    if args.key or args.account:
        scope, subject = _subject(args)
        rows = [
            r for r in rows if r[0] in ("default", "route") or (r[0] == scope.value and r[1].split("@")[0] == subject)
        ]
    if args.format == "json":
        print(json.dumps([{"scope": sc, "subject": su, **p.model_dump(), "note": n} for sc, su, p, n in rows]))
        return 0
    print(
        f"{'scope':8} {'subject':34} {'per_minute':>10} {'per_hour':>9} {'per_day':>8} {'per_month':>10} "
        f"{'mode':8} note"
    )
    for sc, su, p, n in rows:
        cells = [("unlimited" if v is None else str(v)) for v in (p.per_minute, p.per_hour, p.per_day)]
        month = "-" if p.per_month is None else str(p.per_month)  # no monthly quota
        mode = "shadow" if p.shadow or (sc == "default" and settings.limits_shadow) else "enforce"
        print(
            f"{sc:8} {printable(su):34} {cells[0]:>10} {cells[1]:>9} {cells[2]:>8} {month:>10} {mode:8} {printable(n)}"
        )
    return 0


def cmd_limits(args: argparse.Namespace, settings: Settings) -> int:
    from worker.control_topics import current_overrides
    from worker.limits.control import set_override

    if args.action == "backtest":
        return cmd_limits_backtest(args, settings)
    if args.format == "csv" or args.all:
        print(f"meter limits {args.action}: --format csv and --all are for backtest", file=sys.stderr)
        return 2
    if args.action == "show":
        return _show_limits(args, settings, asyncio.run(current_overrides(settings)))
    if not (args.key or args.account):
        print(f"meter limits {args.action}: give --key KEY_ID or --account ACCOUNT_ID", file=sys.stderr)
        return 2
    scope, subject = _subject(args)
    on = f" on route {args.route}" if args.route else ""
    if args.action == "reset":
        asyncio.run(set_override(settings, scope, subject, None, args.note, args.route))
        fallback = "the route's default" if args.route else "the default policy"
        print(f"{scope.value} {subject}{on}: override removed, {fallback} applies")
        return 0
    # A window not given keeps the default's number: the route's default for a route override.
    base = (
        settings.route_policies().get(args.route, LimitPolicy.unlimited()) if args.route else settings.default_policy()
    )
    given = {
        "per_minute": args.per_minute,
        "per_hour": args.per_hour,
        "per_day": args.per_day,
        "per_month": args.per_month,
    }
    if args.unlimited:
        policy = LimitPolicy.unlimited()
    else:
        values = {k: (base.model_dump()[k] if v is _UNSET else v) for k, v in given.items()}
        policy = LimitPolicy(**values)
    if args.shadow:
        policy = policy.model_copy(update={"shadow": True})
    asyncio.run(set_override(settings, scope, subject, policy, args.note, args.route))
    print(
        f"{scope.value} {subject}{on}: {policy.per_minute}/min, {policy.per_hour}/h, {policy.per_day}/day"
        + (f", {policy.per_month}/calendar month (UTC)" if policy.per_month is not None else "")
        + " (None = unlimited)"
        + (" in SHADOW: decided and audited, nodes refuse nothing" if policy.shadow else "")
        + "; workers apply it within a second"
    )
    return 0


_UNSET: object = object()


# long: argparse registration: a flat list of subcommands and their options
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter",
        description="Usage meter for a multi-node HTTP API. Settings come from METER_* environment "
        "variables (or .env): METER_KAFKA_BOOTSTRAP, METER_CLICKHOUSE_DSN, METER_EVENTS_TOPIC, ...",
        epilog="Calendar-month quota (UTC month, blocked until the 1st 00:00 UTC): "
        "`meter limits set --key KEY_ID --per-month 100000` (default for every key: METER_LIMIT_PER_MONTH). "
        "What a candidate policy would have refused in the last 7 days, beside the limits in force: "
        "`meter limits backtest --per-minute 50 --per-hour 600 --all --since 7d`. "
        "A limit for one key on one route (routes get a cost and a route-limit name in the nodes' route "
        "configuration; defaults: METER_ROUTE_LIMITS): "
        "`meter limits set --key KEY_ID --route statements --per-day 50`. "
        "Dry run of a policy: `meter limits set --key KEY_ID --per-minute 50 --shadow`.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=get_args(LogLevel),
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: METER_LOG_LEVEL or INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run a metering worker (consume events, write rollups, evaluate limits)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "migrate",
        help="create or upgrade the ClickHouse schema and set retention from METER_TTL_* / "
        "METER_DEDUP_HORIZON_HOURS (idempotent; one run at a time per database)",
    )
    p.add_argument(
        "--release-lock",
        action="store_true",
        help="only drop the migration lock a killed run left behind (then run migrate or start the workers)",
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("topics", help="create the Kafka topics (events, decisions compacted, DLQ)")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser(
        "kafka-acls", help="print (or --apply, as an admin principal) the Kafka ACLs of each role (docs/operations.md)"
    )
    p.add_argument("--role", choices=[r.value for r in Role])
    p.add_argument("--principal", help="the role's principal (default User:<role>)")
    p.add_argument("--apply", action="store_true", help="create them through METER_KAFKA_* (idempotent)")
    p.set_defaults(func=cmd_kafka_acls)

    p = sub.add_parser("usage", help="print the usage series of one key")
    p.add_argument("--key", required=True, type=key_id, help="the key id (as shown by the API node, never the raw key)")
    p.add_argument("--granularity", choices=[g.value for g in Granularity], default="minute")
    p.add_argument("--since", type=parse_time, help="RFC 3339 start (default: one window back from --until)")
    p.add_argument("--until", type=parse_time, help="RFC 3339 end, exclusive (default: now)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--sparse", action="store_true", help="omit empty buckets instead of printing zeros")
    add_api_argument(p)
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("block", help="block a key on every node now (operator decision)")
    p.add_argument("key", type=key_id, help="key id")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--until", type=parse_time, help="RFC 3339 end of the block")
    group.add_argument("--for", dest="for_", type=parse_duration, help="duration, e.g. 15m, 2h, 1d")
    p.add_argument("--reason", default="", help="shown in the audit trail")
    p.set_defaults(func=cmd_block)

    p = sub.add_parser("unblock", help="lift a key's block on every node now (operator decision)")
    p.add_argument("key", type=key_id, help="key id")
    p.add_argument("--reason", default="", help="shown in the audit trail")
    p.set_defaults(func=cmd_unblock)

    p = sub.add_parser(
        "limits",
        help="show, set or reset per-key / per-account limit overrides; backtest a candidate policy",
        description="backtest: what a candidate policy would have refused, replayed on the minute rollups "
        "(exact at minute granularity) beside the limits in force, e.g. "
        "`meter limits backtest --per-minute 50 --per-hour 600 --all --since 7d`; a limit not given is "
        "the default's, as with set.",
    )
    p.add_argument("action", choices=["show", "set", "reset", "backtest"])
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", type=key_id, help="key id")
    who.add_argument("--account", help="account id")
    for name in ("minute", "hour", "day"):
        p.add_argument(f"--per-{name}", type=parse_limit, default=_UNSET, help="count or 'unlimited'")
    p.add_argument(
        "--per-month",
        type=parse_limit,
        default=_UNSET,
        help="quota per UTC calendar month, blocks until the 1st 00:00 UTC (count or 'unlimited' = none; "
        "set only: backtest ignores it), e.g. `meter limits set --key K --per-month 100000`",
    )
    p.add_argument(
        "--route",
        type=route_name,
        help="the override is for the key's (account's) requests to this route limit only (routes get "
        "their names and costs in the nodes' route configuration; defaults: METER_ROUTE_LIMITS), e.g. "
        "`meter limits set --key K --route statements --per-minute 5`",
    )
    p.add_argument("--unlimited", action="store_true", help="no limit in any window (internal keys)")
    p.add_argument(
        "--shadow",
        action="store_true",
        help="dry run: decided and audited as usual, nodes refuse nothing and count what they would have "
        "refused (X-RateLimit-Shadow header); set again without --shadow to enforce",
    )
    p.add_argument("--note", default="", help="why (kept with the override)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="csv: backtest only")
    add_backtest_arguments(p, who)
    p.set_defaults(func=cmd_limits)

    p = sub.add_parser("why", help="why a key is (not) refused now: its limits, block decision and per-node allowances")
    p.add_argument(
        "key", metavar="KEY_ID", type=key_id, help="the key id (as in events and `meter top`), never the raw key"
    )
    p.add_argument("--account", default="", help="the key's account, to resolve a per-account override")
    p.set_defaults(func=cmd_why)

    p = sub.add_parser("demo", help="live local demo: worker, 3 API nodes, load, who is blocked and when")
    p.add_argument(
        "--duration",
        type=seconds_between(1, 86_400),
        default=100.0,
        help="seconds of load (default 100: shows a rollover)",
    )
    p.add_argument("--nodes", type=count_between(1, 20), default=3, help="how many demo API nodes (1-20)")
    p.add_argument("--base-port", type=int, default=8101, help="first node's port (loopback)")
    p.add_argument(
        "--dashboard-port", type=int, default=8095, help="query API + dashboard (needs METER_ADMIN_API_KEY; 0 = off)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("node", help="serve the demo API (Cryptofuse-like) behind the meter middleware")
    p.add_argument("--port", type=int, default=8101, help="port to serve on (default 8101)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--extra-keys",
        type=count_between(0, 1_000_000),
        default=0,
        metavar="N",
        help="also accept N demo keys k0000.. (load tests)",
    )
    p.set_defaults(func=cmd_node)

    p = sub.add_parser(
        "notify",
        help="deliver threshold notifications to webhooks (signed, retried, dead-lettered)",
        description="Consume the notifications topic (METER_NOTIFICATIONS_TOPIC, default usage.notifications) "
        "in the consumer group METER_NOTIFY_CONSUMER_GROUP and POST each notification as JSON to every URL of "
        "METER_NOTIFY_WEBHOOK_URLS, signed in the header X-Meter-Signature: t=<unix>,v1=<HMAC-SHA-256 of "
        "'<t>.<body>' with METER_NOTIFY_WEBHOOK_SECRET>. Timeouts, connection errors, 408/425/429 and 5xx are "
        "retried with exponential backoff and full jitter (METER_NOTIFY_MAX_ATTEMPTS, "
        "METER_NOTIFY_RETRY_FIRST_DELAY_S, METER_NOTIFY_RETRY_MAX_DELAY_S); what an endpoint never accepts goes "
        "to METER_NOTIFICATIONS_DLQ_TOPIC. Offsets are committed once delivered or dead-lettered: at-least-once, "
        "receivers deduplicate on the notification id. Thresholds: METER_NOTIFY_THRESHOLDS_PERCENT (default "
        "80,100) and METER_NOTIFY_THRESHOLDS_PER_MINUTE|HOUR|DAY; METER_NOTIFY_IN_WORKER=true runs this inside "
        "`meter worker` instead. See docs/operations.md, 'Threshold notifications'.",
        epilog="example: METER_NOTIFY_WEBHOOK_URLS=https://hooks.example.com/meter "
        "METER_NOTIFY_WEBHOOK_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') meter notify",
    )
    p.set_defaults(func=cmd_notify)

    add_analytics_commands(sub)
    add_dlq_commands(sub)
    describe_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"METER_{'_'.join(str(p) for p in e['loc']).upper() or '?'}: {e['msg']}" for e in exc.errors()
        )
        print(f"meter: invalid settings: {problems}", file=sys.stderr)
        return 2
    level = args.log_level or settings.log_level
    setup_logging(level, settings.log_json)
    quiet_client_logs(args.command, level)
    return run_command(args, settings, debug=level.upper() == "DEBUG")


def run_command(args: argparse.Namespace, settings: Settings, debug: bool = False) -> int:
    """Run a parsed command; an expected failure is one line on stderr and exit code 2, anything
    else one line and exit code 1 (the traceback only with ``debug``)."""
    func: Command = args.func
    name = " ".join(filter(None, [args.command, getattr(args, "dlq_action", None)]))
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        line = one_line(exc, settings)
        if line is None:  # not an expected situation: still one line, and how to see more
            line = f"failed: {type(exc).__name__}: {str(exc)[:300]} (--log-level DEBUG shows the traceback)"
            print(f"meter {name}: {line}", file=sys.stderr)
            return 1
        print(f"meter {name}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
