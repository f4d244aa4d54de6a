-- Score a member of a registry (live gateways) with Redis's time, the one clock.
-- KEYS: 1 sorted set; ARGV: 1 member. Returns the time written.
redis.call('ZADD', KEYS[1], NOW, ARGV[1])
return NOW
