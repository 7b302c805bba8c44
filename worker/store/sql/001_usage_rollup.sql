-- Every level of the rollup lives in ONE table so that a batch's minute, hour and day
-- counts, its request_id dedup memory and the Kafka offsets it covers are written by one
-- INSERT of one block into one unpartitioned table: one part, committed atomically.
-- A kill -9 can never leave the counts written and the offsets not, or the reverse.
-- AggregatingMergeTree with SimpleAggregateFunction columns sums counts on merge;
-- readers aggregate with sum() anyway, so unmerged parts read correctly.
CREATE TABLE IF NOT EXISTS {db}.usage_rollup
(
    level          Enum8('offset' = 0, 'minute' = 1, 'hour' = 2, 'day' = 3, 'dedup' = 4, 'client_hour' = 5),
    key_id         String,
    bucket         DateTime('UTC'),
    endpoint       LowCardinality(String),
    status         UInt16,
    node_id        LowCardinality(String),
    client_ip      String,
    account_id     String,
    kafka_partition UInt16,
    requests       SimpleAggregateFunction(sum, UInt64),
    bytes_out      SimpleAggregateFunction(sum, UInt64),
    latency_ms_sum SimpleAggregateFunction(sum, Float64),
    last_offset    SimpleAggregateFunction(max, Int64),
    request_hashes SimpleAggregateFunction(groupArrayArray, Array(UInt64))
)
ENGINE = AggregatingMergeTree
ORDER BY (level, key_id, bucket, endpoint, status, node_id, client_ip, kafka_partition, account_id)
TTL bucket + INTERVAL {ttl_minute_days} DAY DELETE WHERE level = 'minute',
    bucket + INTERVAL {ttl_hour_days} DAY DELETE WHERE level IN ('hour', 'client_hour'),
    bucket + INTERVAL {ttl_day_days} DAY DELETE WHERE level = 'day',
    bucket + INTERVAL {dedup_ttl_hours} HOUR DELETE WHERE level = 'dedup'
SETTINGS non_replicated_deduplication_window = 10000;

CREATE VIEW IF NOT EXISTS {db}.usage_minute AS
SELECT key_id, account_id, bucket, endpoint, status, intDiv(status, 100) AS status_class,
       sum(requests) AS requests, sum(bytes_out) AS bytes_out, sum(latency_ms_sum) AS latency_ms_sum
FROM {db}.usage_rollup WHERE level = 'minute'
GROUP BY key_id, account_id, bucket, endpoint, status;

CREATE VIEW IF NOT EXISTS {db}.usage_hour AS
SELECT key_id, account_id, bucket, endpoint, status, intDiv(status, 100) AS status_class, node_id,
       sum(requests) AS requests, sum(bytes_out) AS bytes_out, sum(latency_ms_sum) AS latency_ms_sum
FROM {db}.usage_rollup WHERE level = 'hour'
GROUP BY key_id, account_id, bucket, endpoint, status, node_id;

CREATE VIEW IF NOT EXISTS {db}.usage_day AS
SELECT key_id, account_id, bucket, endpoint, status, intDiv(status, 100) AS status_class, node_id,
       sum(requests) AS requests, sum(bytes_out) AS bytes_out, sum(latency_ms_sum) AS latency_ms_sum
FROM {db}.usage_rollup WHERE level = 'day'
GROUP BY key_id, account_id, bucket, endpoint, status, node_id;
