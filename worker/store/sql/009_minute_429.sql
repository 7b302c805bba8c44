-- 429 responses per key, minute and endpoint (``minute_429`` rows): the ``minute`` rows of
-- status 429 again, written by the ingest in the batch's one insert. "Top keys by 429s" finds its
-- candidates among a window's 429s; in the minute level those few rows are spread over every
-- granule of the window, so the scan decompressed the key of every row of the day (~1M). In
-- their own level they are a few adjacent granules (bench/queries.py).
ALTER TABLE {db}.usage_rollup MODIFY COLUMN level
    Enum8('offset' = 0, 'minute' = 1, 'hour' = 2, 'day' = 3, 'dedup' = 4, 'client_hour' = 5, 'client_ips' = 6,
          'client_401' = 7, 'minute_429' = 8);

ALTER TABLE {db}.usage_rollup MODIFY TTL
    bucket + INTERVAL {ttl_minute_days} DAY DELETE WHERE level IN ('minute', 'minute_429'),
    bucket + INTERVAL {ttl_hour_days} DAY DELETE WHERE level IN ('hour', 'client_hour', 'client_ips', 'client_401'),
    bucket + INTERVAL {ttl_day_days} DAY DELETE WHERE level = 'day',
    bucket + INTERVAL {dedup_ttl_hours} HOUR DELETE WHERE level = 'dedup'
SETTINGS materialize_ttl_after_modify = 0;

-- The rows stored before this migration (worker.store.rollup.mark_copied_level does the same for
-- bulk imports): per (key, account, minute, endpoint), the minute level's 429s less what
-- minute_429 holds already, so a migration interrupted after this statement and run again adds
-- nothing twice, and rows an older worker writes later can still be derived.
INSERT INTO {db}.usage_rollup (level, key_id, account_id, bucket, status, endpoint, route, requests, bytes_out, latency_ms_sum, cost)
SELECT 'minute_429', key_id, account_id, bucket, 429, endpoint, max(route),
    toInt64(sumIf(requests, level = 'minute')) - toInt64(sumIf(requests, level = 'minute_429')) AS n,
    greatest(0, toInt64(sumIf(bytes_out, level = 'minute')) - toInt64(sumIf(bytes_out, level = 'minute_429'))),
    sumIf(latency_ms_sum, level = 'minute') - sumIf(latency_ms_sum, level = 'minute_429'),
    greatest(0, toInt64(sumIf(cost, level = 'minute')) - toInt64(sumIf(cost, level = 'minute_429')))
FROM {db}.usage_rollup
WHERE level IN ('minute', 'minute_429') AND status = 429
GROUP BY key_id, account_id, bucket, endpoint
HAVING n > 0;
