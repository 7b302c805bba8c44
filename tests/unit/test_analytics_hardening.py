"""Issue 9 on the analytics / CLI side, without a database: DSN redaction, the admin key's
length, the failed-login throttle, and escaping what a terminal would act on."""

from __future__ import annotations

import io
import secrets

import pytest
from pydantic import ValidationError

from worker.analytics.cli import emit, printable
from worker.analytics.throttle import LoginThrottle, client_key
from worker.dsn import redact_dsn
from worker.settings import MIN_ADMIN_KEY_BYTES, Settings

# -- item 15: DSN redaction -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        ("http://user:secret@host:8123/db", "http://user:***@host:8123/db"),
        ("https://host:8443/db?user=meter&password=secret", "https://host:8443/db?user=meter&password=***"),
        ("http://host:8123/?PASSWORD=secret&secure=1", "http://host:8123/?PASSWORD=***&secure=1"),
        ("http://u:p@host:8123/?password=q&access_token=t", "http://u:***@host:8123/?password=***&access_token=***"),
        ("http://user@host:8123/db", "http://user@host:8123/db"),
        ("chdb:///tmp/x", "chdb:///tmp/x"),
        ("chdb:///tmp/x?password=secret", "chdb:///tmp/x?password=***"),
    ],
)
def test_redact_dsn_hides_passwords_in_credentials_and_query(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted


def test_the_demo_prints_the_dsn_redacted() -> None:
    from worker.demo import startup_line

    settings = Settings(clickhouse_dsn="http://meter:hunter2@ch:8123/?password=hunter3")
    line = startup_line(settings)
    assert "hunter2" not in line
    assert "hunter3" not in line
    assert "http://meter:***@ch:8123/?password=***" in line


# -- item 14: the admin key and failed logins -------------------------------------------------


def test_a_short_admin_key_is_refused_at_start_with_a_clear_message() -> None:
    with pytest.raises(ValidationError, match=rf"METER_ADMIN_API_KEY .*at least {MIN_ADMIN_KEY_BYTES} bytes") as err:
        Settings(admin_api_key="x" * (MIN_ADMIN_KEY_BYTES - 1))
    assert "x" * (MIN_ADMIN_KEY_BYTES - 1) not in str(err.value)  # the secret is not echoed
    Settings(admin_api_key="")  # not set: the query API is off
    Settings(admin_api_key=secrets.token_urlsafe(MIN_ADMIN_KEY_BYTES))


def test_the_throttle_lets_a_burst_through_then_refills_at_its_rate() -> None:
    throttle = LoginThrottle(burst=3, per_second=0.5)
    for _ in range(3):
        assert throttle.retry_after("a", 0.0) == 0
        throttle.failed("a", 0.0)
    assert throttle.retry_after("a", 0.0) == pytest.approx(2.0)  # one token at 0.5/s
    assert throttle.retry_after("b", 0.0) == 0  # per client
    assert throttle.retry_after("a", 1.0) == pytest.approx(1.0)
    assert throttle.retry_after("a", 2.0) == 0
    throttle.failed("a", 2.0)
    assert throttle.retry_after("a", 2.0) == pytest.approx(2.0)
    assert throttle.retry_after("a", 100.0) == 0  # refilled, never above the burst:
    for _ in range(3):
        throttle.failed("a", 100.0)
    assert throttle.retry_after("a", 100.0) > 0


def test_the_throttle_remembers_a_bounded_number_of_clients() -> None:
    throttle = LoginThrottle(burst=1, per_second=0.01, max_clients=2)
    for client in ("a", "b", "c"):
        throttle.failed(client, 0.0)
    assert len(throttle) == 2
    assert throttle.retry_after("a", 0.0) == 0  # the oldest was forgotten
    assert throttle.retry_after("c", 0.0) > 0


def test_client_key_groups_an_ipv6_64_and_keeps_other_addresses() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("203.0.113.9") == "203.0.113.9"
    assert client_key("::ffff:203.0.113.9") == "203.0.113.9"
    assert client_key("testclient") == "testclient"
    assert client_key(None) == "unknown"


# -- item 9: what reaches a terminal ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/v0/payments", "/v0/payments"),
        ("/v0/\x1b[2J\x1b]0;pwned\x07", "/v0/\\x1b[2J\\x1b]0;pwned\\x07"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("/v0/\x9b31m", "/v0/\\x9b31m"),  # C1 CSI
        ("/v0/\u202egnp.exe", "/v0/\\u202egnp.exe"),  # bidi override
        ("/v0/\u2066x\u2069\u200f", "/v0/\\u2066x\\u2069\\u200f"),
        ("/v0/caf\u00e9 \u65e5\u672c", "/v0/caf\u00e9 \u65e5\u672c"),  # printable non-ASCII stays
        ("back\\slash", "back\\\\slash"),  # so an escape in the output is always one
    ],
)
def test_printable_escapes_controls(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_table_output_escapes_cells_and_keeps_csv_exact() -> None:
    rows = [{"rank": 1, "id": "/v0/\x1b[31mred\u202e"}]
    table = io.StringIO()
    emit(rows, ["rank", "id"], "table", out=table)
    assert "\x1b" not in table.getvalue()
    assert "\u202e" not in table.getvalue()
    assert "/v0/\\x1b[31mred\\u202e" in table.getvalue()
    data = io.StringIO()
    emit(rows, ["rank", "id"], "csv", out=data)
    assert "/v0/\x1b[31mred\u202e" in data.getvalue()  # data formats keep the stored value


def test_limits_show_escapes_the_subject_and_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime

    from schemas.limits import LimitOverride, LimitPolicy, OverrideScope
    from worker import control_topics as control
    from worker.cli import build_parser, cmd_limits

    # model_construct: a record written before the contract refused controls.
    override = LimitOverride.model_construct(
        scope=OverrideScope.key,
        subject="k\x1b[2J",
        policy=LimitPolicy(per_minute=1, per_hour=2, per_day=3),
        updated_at=datetime(2026, 1, 1, tzinfo=UTC),
        note="ticket \u202e42",
    )

    async def overrides(_settings: Settings) -> dict[str, LimitOverride]:
        return {"key:k": override}

    monkeypatch.setattr(control, "current_overrides", overrides)
    assert cmd_limits(build_parser().parse_args(["limits", "show"]), Settings()) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "k\\x1b[2J" in out
    assert "ticket \\u202e42" in out
