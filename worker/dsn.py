"""ClickHouse DSNs: which store one names, and how one is shown (never with its secrets).

Apart from the client (worker.store.client) so that the settings can check a DSN too.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

# Query parameters whose value is a secret (clickhouse-connect takes ``?password=``,
# ``?access_token=``, ...): any name mentioning one of these words, case-insensitive.
_SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|credential|auth|(^|_)key$", re.IGNORECASE)


def is_embedded(dsn: str) -> bool:
    return dsn.startswith("chdb:")


def embedded_path(dsn: str) -> Path | None:
    """The data directory of an embedded store on disk (None: a server, or in memory)."""
    if not is_embedded(dsn):
        return None
    path = dsn.removeprefix("chdb://").removeprefix("chdb:")
    return Path(path) if path and path not in ("memory", ":memory:") else None


def redact_dsn(dsn: str) -> str:
    """A DSN fit for logs: the password of ``user:password@`` and secret query values replaced.

    Parsed as clickhouse-connect parses it (``urlsplit``; query values become client
    arguments, ``password`` among them). Use it wherever a DSN is printed or logged.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:  # e.g. an unclosed "[" in the host: no telling where the password is
        return "<unparsable DSN>"
    netloc = parts.netloc
    if parts.username is None and "@" in dsn.partition("://")[2]:
        # Credentials that do not parse (an unencoded "#", "/" or "?" in the password cuts the
        # host part short): no telling where the password ends, so none of it is shown.
        return f"{parts.scheme}://<credentials that do not parse>"
    if parts.password is not None:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join(
        f"{name}=***" if sep and _SECRET_PARAMETER.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    )
    # Replaced in place: urlunsplit would turn ``chdb:///dir`` into ``chdb:/dir``.
    return dsn.replace(parts.netloc, netloc, 1).replace(f"?{parts.query}", f"?{query}", 1)
