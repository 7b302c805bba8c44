"""The node's security settings: secret strength, health token, trusted proxies, public routes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from node.demo_api import ServingTime
from node.settings import NodeSettings
from tests.node_secret import NODE_SECRET
from worker.cli import main


@pytest.mark.parametrize("field", ["node_secret", "node_health_token"])
def test_short_secrets_are_refused(field: str) -> None:
    with pytest.raises(ValidationError, match=rf"METER_{field.upper()} must be at least 32 bytes"):
        NodeSettings(**{field: "x" * 31})  # type: ignore[arg-type]
    assert NodeSettings(**{field: NODE_SECRET}).model_dump()[field]  # type: ignore[arg-type]
    assert NodeSettings(**{field: ""}).model_dump()  # type: ignore[arg-type]  # unset: not configured


def test_a_node_with_a_weak_secret_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METER_NODE_SECRET", "x")
    monkeypatch.setenv("METER_DEMO_SEED", NODE_SECRET)

    async def served(*args: object, **kwargs: object) -> None:
        raise AssertionError("the node started")  # instead of serving until the test times out

    monkeypatch.setattr("node.demo_api.run_node", served)
    assert main(["node", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "METER_NODE_SECRET must be at least 32 bytes" in err
    assert "secrets.token_hex(32)" in err  # says how to make one


def test_trusted_proxies_are_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NodeSettings().node_trusted_proxies == ()  # nothing trusted by default, loopback neither
    monkeypatch.setenv("METER_NODE_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1 ,::1")
    assert [str(n) for n in NodeSettings(_env_file=None).node_trusted_proxies] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
        "::1/128",
    ]
    monkeypatch.setenv("METER_NODE_TRUSTED_PROXIES", "10.0.0.1/8")  # host bits set: a typo, not a network
    with pytest.raises(ValidationError, match="node_trusted_proxies"):
        NodeSettings(_env_file=None)


def test_public_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NodeSettings().node_public_routes == ()
    monkeypatch.setenv("METER_NODE_PUBLIC_ROUTES", "/v0/status, /v0/time")
    assert NodeSettings(_env_file=None).node_public_routes == ("/v0/status", "/v0/time")
    for bad in ("v0/status", "/v0/status?x=1", ""):
        with pytest.raises(ValidationError, match="node_public_routes"):
            NodeSettings(node_public_routes=(bad,))


def test_the_demo_serving_range_is_checked() -> None:
    assert NodeSettings(demo_serving_ms=0, demo_serving_max_ms=2000).demo_serving_max_ms == 2000
    refused = r"METER_DEMO_SERVING_MAX_MS \(50\) is below METER_DEMO_SERVING_MS \(100\)"
    with pytest.raises(ValidationError, match=refused):
        NodeSettings(demo_serving_ms=100, demo_serving_max_ms=50)


async def test_demo_calls_take_a_time_drawn_from_the_range() -> None:
    drawn: list[tuple[float, float]] = []

    def draw(low: float, high: float) -> float:
        drawn.append((low, high))
        return 0.0

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    serving = ServingTime(app, 0.1, longest=0.5, draw=draw)  # type: ignore[arg-type]
    for _ in range(3):
        await serving({"type": "http", "path": "/v0/status"}, None, None)  # type: ignore[arg-type]
    await serving({"type": "http", "path": "/health"}, None, None)  # type: ignore[arg-type]  # not the API
    assert drawn == [(0.1, 0.5)] * 3
