-- Extend the scheduler lease, only if this scheduler still holds it.
-- ARGV: 1 named arguments (corral.scripts.Lease). Returns 1 when extended, 0 otherwise.
local lease = KEYS[1]
local a = cjson.decode(ARGV[1])
if redis.call('GET', lease) == a.holder then
  return redis.call('PEXPIRE', lease, a.ttl_ms)
end
return 0
