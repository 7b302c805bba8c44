-- 401 responses per key, hour and client address (``client_401`` rows): the ``client_hour``
-- rows of status 401 again, written by the ingest in the batch's one insert. The invalid-key
-- storm signal groups a day's 401s by address; in ``client_hour`` those few rows are spread
-- over every granule of the day (sorted by key), so the scan read the whole day's addresses
-- and keys. In their own level they are a few adjacent granules (bench/queries.py).
ALTER TABLE {db}.usage_rollup MODIFY COLUMN level
    Enum8('offset' = 0, 'minute' = 1, 'hour' = 2, 'day' = 3, 'dedup' = 4, 'client_hour' = 5, 'client_ips' = 6,
          'client_401' = 7);

ALTER TABLE {db}.usage_rollup MODIFY TTL
    bucket + INTERVAL {ttl_minute_days} DAY DELETE WHERE level = 'minute',
    bucket + INTERVAL {ttl_hour_days} DAY DELETE WHERE level IN ('hour', 'client_hour', 'client_ips', 'client_401'),
    bucket + INTERVAL {ttl_day_days} DAY DELETE WHERE level = 'day',
    bucket + INTERVAL {dedup_ttl_hours} HOUR DELETE WHERE level = 'dedup'
SETTINGS materialize_ttl_after_modify = 0;

-- The rows stored before this migration (worker.store.rollup.mark_copied_level does the same
-- for bulk imports): per (key, account, hour, address), client_hour's 401s less what
-- client_401 holds already, so a migration interrupted after this statement and run again
-- adds nothing twice, and rows an older worker writes later can still be derived.
INSERT INTO {db}.usage_rollup (level, key_id, account_id, bucket, status, client_ip, requests, bytes_out, latency_ms_sum, cost)
SELECT 'client_401', key_id, account_id, bucket, 401, client_ip,
    toInt64(sumIf(requests, level = 'client_hour')) - toInt64(sumIf(requests, level = 'client_401')) AS n,
    greatest(0, toInt64(sumIf(bytes_out, level = 'client_hour')) - toInt64(sumIf(bytes_out, level = 'client_401'))),
    sumIf(latency_ms_sum, level = 'client_hour') - sumIf(latency_ms_sum, level = 'client_401'),
    greatest(0, toInt64(sumIf(cost, level = 'client_hour')) - toInt64(sumIf(cost, level = 'client_401')))
FROM {db}.usage_rollup
WHERE level IN ('client_hour', 'client_401') AND status = 401 AND client_ip != ''
GROUP BY key_id, account_id, bucket, client_ip
HAVING n > 0;
