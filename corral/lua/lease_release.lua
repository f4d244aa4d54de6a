-- Give up the scheduler lease, only if this scheduler still holds it.
-- KEYS: 1 lease; ARGV: 1 holder id. Returns 1 when released, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
