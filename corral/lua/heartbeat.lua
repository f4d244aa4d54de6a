-- A worker's heartbeat: its record (with the time it was written) and its registry score,
-- both on Redis's clock, so no comparison of liveness ever reads a worker's own clock.
-- ARGV: 1 named arguments (corral.scripts.Heartbeat), 2 the record (JSON object, no "ts")
-- Returns the time written.
local node_key, nodes = KEYS[1], KEYS[2]
local a = cjson.decode(ARGV[1])
-- Spliced as text: cjson would turn the record's empty lists into objects.
local record = string.sub(ARGV[2], 1, -2) .. ',"ts":' .. NOW .. '}'
redis.call('SET', node_key, record, 'PX', a.ttl_ms)
redis.call('ZADD', nodes, NOW, a.node_id)
return NOW
