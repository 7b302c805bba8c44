"""Per-key activity the abuse guards watch, read from the rollups (parameterized SQL only)."""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from worker.store.rollup import rollup_table


def keys_with_many_client_ips(client: Client, database: str, hour: int, over: int, cap: int) -> list[tuple[str, int]]:
    """(key, distinct client IPs) of the keys seen from more than ``over`` addresses in the
    hour starting at ``hour`` (epoch seconds); exact up to ``over + 1``, which is all a rule needs."""
    rows = client.query(
        f"SELECT key_id, uniqUpTo({int(over) + 1})(client_ip) AS ips FROM {rollup_table(database)} "
        "WHERE level = 'client_hour' AND bucket = toDateTime({hour:UInt32}, 'UTC') AND client_ip != '' "
        "GROUP BY key_id HAVING ips > {over:UInt64} ORDER BY ips DESC, key_id LIMIT {cap:UInt32}",
        parameters={"hour": hour, "over": over, "cap": cap},
    ).result_rows
    return [(str(key), int(ips)) for key, ips in rows]


def keys_with_auth_failures(
    client: Client, database: str, since: int, until: int, over: int, cap: int
) -> list[tuple[str, int]]:
    """(key, 401 + 403 responses) of the keys with more than ``over`` of them in the minutes
    [since, until) (epoch seconds)."""
    rows = client.query(
        f"SELECT key_id, sum(requests) AS n FROM {rollup_table(database)} "
        "WHERE level = 'minute' AND status IN (401, 403) "
        "AND bucket >= toDateTime({since:UInt32}, 'UTC') AND bucket < toDateTime({until:UInt32}, 'UTC') "
        "GROUP BY key_id HAVING n > {over:UInt64} ORDER BY n DESC, key_id LIMIT {cap:UInt32}",
        parameters={"since": since, "until": until, "over": over, "cap": cap},
    ).result_rows
    return [(str(key), int(n)) for key, n in rows]
