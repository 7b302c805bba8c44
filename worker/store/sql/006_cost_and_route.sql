-- Cost per request and route limits (event contract v2). ``cost`` sums what the requests spent
-- of their keys' limits; rows written before it read as ``requests`` (every request cost 1).
-- ``route`` is the route limit the rows' endpoint counts against ('' for none): a function of
-- the endpoint in the nodes' route configuration, so it adds no rows and is not in the key;
-- max() on merge keeps the name when rows from before the route was configured meet rows after.
ALTER TABLE {db}.usage_rollup
    ADD COLUMN IF NOT EXISTS cost SimpleAggregateFunction(sum, UInt64) DEFAULT requests,
    ADD COLUMN IF NOT EXISTS route SimpleAggregateFunction(max, LowCardinality(String)) DEFAULT '';
