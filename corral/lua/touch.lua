-- Score a member of a registry (live gateways) with Redis's time, the one clock.
-- ARGV: 1 named arguments (corral.scripts.Touch). Returns the time written.
local registry = KEYS[1]
local a = cjson.decode(ARGV[1])
redis.call('ZADD', registry, NOW, a.member)
return NOW
