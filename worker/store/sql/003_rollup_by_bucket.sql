-- Analytics across all keys ("top keys of the last hour", abuse signals, traffic over time)
-- filter on (level, bucket) but the table is ordered (level, key_id, bucket, ...): without
-- help they read every row of a level. A projection ordered by (level, bucket, key_id)
-- lives inside each part, so the ingest's one-INSERT-one-part atomicity is unchanged; it
-- carries only the columns those queries read (not the dedup hash arrays).
-- AggregatingMergeTree collapses rows on merge, so the projection must be rebuilt then.
ALTER TABLE {db}.usage_rollup MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE {db}.usage_rollup ADD PROJECTION IF NOT EXISTS by_bucket
(
    SELECT level, bucket, key_id, account_id, endpoint, status, node_id, client_ip, requests, bytes_out
    ORDER BY level, bucket, key_id
);

-- Builds the projection for parts written before this migration (a no-op on a new table).
ALTER TABLE {db}.usage_rollup MATERIALIZE PROJECTION by_bucket;
