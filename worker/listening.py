"""Where a worker on the embedded store listens, written next to its data directory.

chDB is one process per data directory: while a worker meters, no other process can open its
store. The worker serves the query API instead, and says where in ``<data dir>.worker.json``
so the CLI's read commands can find it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from worker.dsn import embedded_path


@dataclass(frozen=True)
class WorkerEndpoint:
    pid: int
    url: str  # base URL of the worker's HTTP listener (/health, /metrics, and /v1 when api)
    api: bool  # the query API is served (an admin key is configured)


def endpoint_file(dsn: str) -> Path | None:
    """The file for the store of ``dsn`` (None: not an embedded store on disk)."""
    path = embedded_path(dsn)
    return path.with_name(path.name + ".worker.json") if path is not None else None


def announce(dsn: str, endpoint: WorkerEndpoint) -> Path | None:
    file = endpoint_file(dsn)
    if file is not None:
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps({"pid": endpoint.pid, "url": endpoint.url, "api": endpoint.api}))
        tmp.replace(file)
    return file


def withdraw(dsn: str) -> None:
    file = endpoint_file(dsn)
    if file is not None:
        found = _read(file)
        if found is not None and found.pid == os.getpid():
            file.unlink(missing_ok=True)


def running_worker(dsn: str) -> WorkerEndpoint | None:
    """The worker that announced itself for this store, if its process still runs."""
    file = endpoint_file(dsn)
    found = _read(file) if file is not None else None
    return found if found is not None and _alive(found.pid) else None


def _read(file: Path) -> WorkerEndpoint | None:
    try:
        body = json.loads(file.read_text())
        return WorkerEndpoint(int(body["pid"]), str(body["url"]), bool(body["api"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
