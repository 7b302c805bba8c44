"""Binding before uvicorn: a port that cannot be listened on is one clear error."""

from __future__ import annotations

import pytest

from common.listen import PortUnavailable, listening_socket


def test_a_port_in_use_is_one_clear_error() -> None:
    taken = listening_socket("127.0.0.1", 0)
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(PortUnavailable, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listening_socket("127.0.0.1", port)
    finally:
        taken.close()


@pytest.mark.parametrize(
    ("host", "port", "why"),
    [("127.0.0.1", 99_999, "out of range"), ("no-such-host.invalid", 80, "cannot listen on no-such-host.invalid:80")],
)
def test_an_address_that_cannot_be_listened_on_is_refused(host: str, port: int, why: str) -> None:
    with pytest.raises(PortUnavailable, match=why):
        listening_socket(host, port)
