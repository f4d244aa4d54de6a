-- Put a job waiting for its retry (or a dead-lettered one an operator requeued) back into
-- its priority stream. Called by the RQ retry job when its backoff has passed.
-- Safe to run twice: the state check refuses a job that is no longer waiting.
-- ARGV: 1 named arguments (corral.scripts.Revive)
-- Returns the new entry id, or false when the job was not in an allowed state.
local job_key, stream, queued_count, doorbell, stats, models, retry_scheduled =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local a = cjson.decode(ARGV[1])

local rec = redis.call('HMGET', job_key, 'state', 'id', 'model')
local allowed = false
for _, state in ipairs(a.allowed) do
  allowed = allowed or state == rec[1]
end
if not allowed then
  return false
end
if redis.call('EXISTS', stream) == 0 then
  redis.call('XGROUP', 'CREATE', stream, a.group, '0', 'MKSTREAM')
end
redis.call('SADD', models, rec[3])
local entry = redis.call('XADD', stream, '*', 'j', rec[2])
redis.call('HSET', job_key, 'state', 'queued', 'entry', entry, 'requeued', NOW)
redis.call('HDEL', job_key, 'finished', 'error', 'status', 'streamed')
redis.call('PERSIST', job_key)
redis.call('ZREM', retry_scheduled, rec[2])
if a.reset_attempts then
  redis.call('HSET', job_key, 'attempts', 0)
end
redis.call('INCR', queued_count)
redis.call('LPUSH', doorbell, '1')
redis.call('LTRIM', doorbell, 0, a.doorbell_cap - 1)
redis.call('HINCRBY', stats, 'revived', 1)
return entry
