-- Audit of every threshold notification published (one row per key, window start and
-- threshold). ReplacingMergeTree on that crossing: the same notification recorded twice (a
-- worker that crashed between publishing and recording it publishes it again, with the same
-- id) collapses to one row. A worker reads the rows of the current windows when a partition
-- is assigned to it, so it does not notify again what the previous owner did.
CREATE TABLE IF NOT EXISTS {db}.notifications
(
    id                 String,
    key_id             String,
    account_id         String,
    window             LowCardinality(String),
    window_start       DateTime64(0, 'UTC'),
    window_end         DateTime64(0, 'UTC'),
    threshold          LowCardinality(String),
    threshold_percent  Nullable(Float64),
    threshold_count    UInt64,
    limit_value        Nullable(UInt64),
    count_value        UInt64,
    version            UInt64,
    decided_at         DateTime64(3, 'UTC'),
    source             LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (key_id, window_start, window, threshold)
TTL toDateTime(decided_at) + INTERVAL {ttl_day_days} DAY;
