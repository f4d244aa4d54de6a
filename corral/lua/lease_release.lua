-- Give up the scheduler lease, only if this scheduler still holds it.
-- ARGV: 1 named arguments (corral.scripts.Lease). Returns 1 when released, 0 otherwise.
local lease = KEYS[1]
local a = cjson.decode(ARGV[1])
if redis.call('GET', lease) == a.holder then
  return redis.call('DEL', lease)
end
return 0
