-- Audit trail of every block / unblock decision (worker-made and operator-made).
-- ReplacingMergeTree on (key_id, version): the same decision recorded twice (a retry, or
-- several workers auditing the decisions topic) collapses to one row.
CREATE TABLE IF NOT EXISTS {db}.decisions
(
    key_id       String,
    version      UInt64,
    action       Enum8('block' = 1, 'unblock' = 2),
    window       LowCardinality(String),
    limit_value  Nullable(UInt64),
    count_value  Nullable(UInt64),
    until        Nullable(DateTime64(3, 'UTC')),
    reason       String,
    source       LowCardinality(String),
    decided_at   DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (key_id, version)
TTL toDateTime(decided_at) + INTERVAL {ttl_day_days} DAY;
