"""The listening socket of an HTTP server, bound before the server starts.

uvicorn binds inside its ``serve()`` task and, when it cannot, exits the process from there
(``SystemExit`` out of the event loop: a traceback instead of a message). Binding first turns a
port in use or out of range into one error the caller can report.
"""

from __future__ import annotations

import socket


class PortUnavailable(OSError):
    """The address cannot be listened on (in use, out of range, not an address of this host)."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: any free port), for ``uvicorn.Server.serve(sockets=...)``."""
    if not 0 <= port <= 65535:
        raise PortUnavailable(f"cannot listen on {host}:{port}: port out of range (0-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise PortUnavailable(f"cannot listen on {host}:{port}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts need no wait
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
