from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from schemas.usage import Granularity
from worker.cli import build_parser, parse_time, run_command
from worker.dsn import redact_dsn
from worker.settings import Settings
from worker.store.client import quote_identifier
from worker.store.migrations import discover, left_by_a_dead_run, render
from worker.store.usage import MAX_POINTS, default_range


def test_parse_time_accepts_rfc3339_and_refuses_naive() -> None:
    assert parse_time("2026-11-27T12:00:00Z") == datetime(2026, 11, 27, 12, tzinfo=UTC)
    assert parse_time("2026-11-27T13:00:00+01:00") == datetime(2026, 11, 27, 12, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="offset"):
        parse_time("2026-11-27T12:00:00")
    with pytest.raises(argparse.ArgumentTypeError, match="RFC 3339"):
        parse_time("yesterday")


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "verbose", "topics"],
        ["blocked", "-n", "-1"],
        ["top", "-n", "1001"],
        ["dlq", "show", "--limit", "x"],
        ["key-state", "--key", "k1", "--history", "-1"],
        ["key-state", "--key", "k1", "--history", "501"],
        ["demo", "--nodes", "0"],
        ["demo", "--duration", "-5"],
        ["demo", "--duration", "soon"],
        ["node", "--extra-keys", "-1"],
    ],
)
def test_a_bad_argument_value_is_a_usage_error_not_a_traceback(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2


def test_log_levels_are_taken_in_any_case_and_others_refused() -> None:
    assert build_parser().parse_args(["--log-level", "debug", "topics"]).log_level == "DEBUG"
    assert Settings(log_level="warning").log_level == "WARNING"
    with pytest.raises(ValueError, match="log_level"):
        Settings(log_level="verbose")


def test_usage_command_line() -> None:
    args = build_parser().parse_args(["usage", "--key", "k", "--granularity", "hour", "--format", "json"])
    assert (args.key, args.granularity, args.format) == ("k", "hour", "json")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["usage", "--key", "k", "--granularity", "week"])


def test_default_range_aligns_and_bounds() -> None:
    now = datetime(2026, 11, 27, 12, 34, 56, tzinfo=UTC)
    since, until = default_range(Granularity.hour, None, None, now)
    assert since == datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert until == now
    with pytest.raises(ValueError, match="before"):
        default_range(Granularity.minute, now, now - timedelta(minutes=1))
    with pytest.raises(ValueError, match=str(MAX_POINTS)):
        default_range(Granularity.minute, now - timedelta(days=365), now)


def test_migrations_render_from_settings_only() -> None:
    settings = Settings(clickhouse_database="m_test", ttl_minute_days=3)
    migrations = discover(settings.migrations_dir)
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations, "the package ships its migrations"
    statements = render(migrations[0].path.read_text(), settings)
    assert any("`m_test`.usage_rollup" in s and "INTERVAL 3 DAY" in s for s in statements)
    assert all("{" not in s.split("SETTINGS")[0] for s in statements)


def test_identifiers_and_dsn_redaction() -> None:
    assert quote_identifier("meter") == "`meter`"
    with pytest.raises(ValueError, match="invalid ClickHouse identifier"):
        quote_identifier("bad`name")
    assert redact_dsn("http://user:secret@host:8123/db") == "http://user:***@host:8123/db"
    assert redact_dsn("chdb:///tmp/x") == "chdb:///tmp/x"


def test_a_settle_time_past_the_burst_wait_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"METER_ALLOWANCE_SETTLE_MS .* must be below METER_NODE_BURST_WAIT_MS"):
        Settings(allowance_settle_ms=300, node_burst_wait_ms=250)


def test_every_subcommand_help_says_what_it_does() -> None:
    def commands(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.ArgumentParser]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += [(f"{path} {name}", sub), *commands(sub, f"{path} {name}")]
        return found

    listed = commands(build_parser(), "meter")
    assert len(listed) > 20
    assert [name for name, sub in listed if not sub.description] == []


@pytest.mark.parametrize("dsn", ["foo://bar", "htp://user:pw@host:8123", "/var/lib/meter", ""])
def test_a_store_dsn_of_no_known_kind_is_refused_without_repeating_it(dsn: str) -> None:
    with pytest.raises(ValueError, match="is not a store") as refused:
        Settings(clickhouse_dsn=dsn)
    assert "pw@" not in str(refused.value)


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"consumer_session_timeout_ms": 2_400_000}, "less than or equal to 1800000"),  # no worker could join
        ({"consumer_heartbeat_interval_ms": 15_000, "consumer_session_timeout_ms": 6_000}, "HEARTBEAT_INTERVAL_MS"),
        ({"ttl_day_days": 1}, "greater than or equal to 31"),  # the month count is rebuilt from day rows
    ],
)
def test_settings_that_cannot_work_are_refused_at_start(values: dict[str, int], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Settings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dsn", "why"),
    [
        ("CHDB:///tmp/x", "in lower case"),  # the client takes it for HTTP to localhost:8123
        ("chdb://.data/clickhouse", "must be absolute"),  # the client reads ".data" as the location
        ("http://default:s3cr#t@127.0.0.1:8123/db", "must be URL-encoded"),  # the host part is cut at '#'
        ("http://u:12#ab@h/db", "must be URL-encoded"),  # parses, as host "u" port 12
        ("http://h:99999", "do not parse"),
    ],
)
def test_a_store_dsn_the_client_would_misread_is_refused_without_repeating_it(dsn: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as refused:
        Settings(clickhouse_dsn=dsn)
    assert "s3cr" not in str(refused.value)
    assert "12#ab" not in str(refused.value)


@pytest.mark.parametrize("dsn", ["http://default:s3cr#t@127.0.0.1:8123/db", "http://u:12#ab@h/db"])
def test_credentials_that_do_not_parse_are_not_shown(dsn: str) -> None:
    assert redact_dsn(dsn) == "http://<credentials that do not parse>"


@pytest.mark.parametrize(
    "dsn", ["chdb:///tmp/x", "chdb:/tmp/x", "chdb:memory", "http://h:8123", "https://u:p%23w@h", "clickhouse://h"]
)
def test_the_store_dsns_the_client_opens_are_taken(dsn: str) -> None:
    assert Settings(clickhouse_dsn=dsn).clickhouse_dsn == dsn


RAW_KEY = "cf_live_4f9d0c2a7b1e8f3d6a5c4b3a2f1e0d9c8b7a"  # what a node's client sends: never an argument


@pytest.mark.parametrize(
    "argv",
    [
        ["block", RAW_KEY, "--for", "1m"],
        ["unblock", RAW_KEY],
        ["limits", "set", "--key", RAW_KEY, "--per-minute", "5"],
        ["why", RAW_KEY],
        ["usage", "--key", RAW_KEY],
        ["key-usage", "--key", RAW_KEY],
        ["key-state", "--key", RAW_KEY],
        ["signals", "--key", RAW_KEY],
    ],
)
def test_a_raw_key_pasted_for_a_key_id_is_refused_and_not_repeated(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    said = capsys.readouterr().err
    assert "not a key id" in said
    assert RAW_KEY not in said


@pytest.mark.parametrize(
    "key",
    [
        "cfxali_cf2a91d59aea986a542ccbf3",
        "short_0123456789abcdef01234567",
        "k1",
        "cfxali_cf2a91d59aea986a542ccbf3@statements",
    ],
)
def test_key_ids_and_route_subjects_are_taken(key: str) -> None:
    assert build_parser().parse_args(["unblock", key]).key == key


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["limits", "set", "--account", "acme@corp", "--per-minute", "5"], "an account id containing '@'"),
        (["unblock", "cfxali_cf2a91d59aea986a542ccbf3", "--reason", "r" * 600], "reason: String should have at most"),
        (["block", "cfxali_cf2a91d59aea986a542ccbf3", "--until", "2020-01-01T00:00:00Z"], "is not in the future"),
    ],
)
def test_an_operator_action_out_of_bounds_is_one_line_and_exit_2_before_kafka(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1")  # nothing listens: refused before any connection
    assert run_command(build_parser().parse_args(argv), settings) == 2
    err = capsys.readouterr().err
    assert said in err
    assert len(err.strip().splitlines()) == 1


def test_a_lock_is_judged_left_by_a_dead_run_only_on_the_embedded_engine() -> None:
    left = "worker-7 pid 1 since 2026-12-03 00:00:00 UTC, run 0a1b2c3d"
    embedded = Settings(clickhouse_dsn="chdb:///var/lib/meter")
    assert left_by_a_dead_run(left, embedded)  # no other process can have that store open
    # A server is shared: the holder may be migrating on another host, so it is waited for.
    assert not left_by_a_dead_run(left, Settings(clickhouse_dsn="http://clickhouse:8123"))
