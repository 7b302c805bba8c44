-- Distinct client addresses per key and UTC day (``client_ips`` rows): the worker counts them
-- as it writes a batch (worker/ingest/client_ips.py) and writes the count whenever it grows
-- past 1, in the batch's one insert; max() on merge keeps the highest. The leaked-key signal
-- reads these few rows to find its candidate keys instead of grouping every key's addresses.
-- Adding an Enum value is a metadata change; the TTL is restated with the new level (its
-- rows live as long as the hour rows they summarise) without rewriting stored parts.
ALTER TABLE {db}.usage_rollup MODIFY COLUMN level
    Enum8('offset' = 0, 'minute' = 1, 'hour' = 2, 'day' = 3, 'dedup' = 4, 'client_hour' = 5, 'client_ips' = 6);

ALTER TABLE {db}.usage_rollup
    ADD COLUMN IF NOT EXISTS client_ips SimpleAggregateFunction(max, UInt32) DEFAULT 0;

ALTER TABLE {db}.usage_rollup MODIFY TTL
    bucket + INTERVAL {ttl_minute_days} DAY DELETE WHERE level = 'minute',
    bucket + INTERVAL {ttl_hour_days} DAY DELETE WHERE level IN ('hour', 'client_hour', 'client_ips'),
    bucket + INTERVAL {ttl_day_days} DAY DELETE WHERE level = 'day',
    bucket + INTERVAL {dedup_ttl_hours} HOUR DELETE WHERE level = 'dedup'
SETTINGS materialize_ttl_after_modify = 0;
