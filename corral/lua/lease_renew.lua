-- Extend the scheduler lease, only if this scheduler still holds it.
-- KEYS: 1 lease; ARGV: 1 holder id, 2 ttl (ms). Returns 1 when extended, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
