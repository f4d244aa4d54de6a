-- A worker's heartbeat: its record (with the time it was written) and its registry score,
-- both on Redis's clock, so no comparison of liveness ever reads a worker's own clock.
-- KEYS: 1 node record, 2 node registry (sorted set)
-- ARGV: 1 node id, 2 record (JSON object, without "ts"), 3 record ttl (ms)
-- Returns the time written.
-- (Spliced as text: cjson would turn the record's empty lists into objects.)
local record = string.sub(ARGV[2], 1, -2) .. ',"ts":' .. NOW .. '}'
redis.call('SET', KEYS[1], record, 'PX', tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], NOW, ARGV[1])
return NOW
