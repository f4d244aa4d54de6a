-- Put a job waiting for its retry (or a dead-lettered one an operator requeued) back into
-- its priority stream. Called by the RQ retry job when its backoff has passed.
-- Safe to run twice: the state check refuses a job that is no longer waiting.
-- KEYS: 1 job record, 2 stream, 3 queued counter, 4 doorbell, 5 stats, 6 set of known models,
--       7 scheduled retries (sorted set)
-- ARGV: 1 group, 2 (unused), 3 doorbell cap, 4 states allowed ('retrying' or 'retrying,dead'),
--       5 reset attempts ('1' for an operator's requeue from the dead-letter queue)
-- Returns the new entry id, or false when the job was not in an allowed state.
local rec = redis.call('HMGET', KEYS[1], 'state', 'id', 'model')
if not rec[1] or not string.find(',' .. ARGV[4] .. ',', ',' .. rec[1] .. ',', 1, true) then
  return false
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
end
redis.call('SADD', KEYS[6], rec[3])
local entry = redis.call('XADD', KEYS[2], '*', 'j', rec[2])
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', entry, 'requeued', NOW)
redis.call('HDEL', KEYS[1], 'finished', 'error', 'status', 'streamed')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[7], rec[2])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'attempts', 0)
end
redis.call('INCR', KEYS[3])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[3]) - 1)
redis.call('HINCRBY', KEYS[5], 'revived', 1)
return entry
