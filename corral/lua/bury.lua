-- End a job that cannot go on: its retries are used up (dead), or its deadline passed while
-- it waited for a retry (expired). Tells its waiting gateway, if any.
-- Safe to run twice: the state check refuses a job that is no longer waiting.
-- ARGV: 1 named arguments (corral.scripts.Bury)
-- Returns 1 when done, 0 when the job was no longer in the expected state.
local job_key, stats, retry_scheduled = KEYS[1], KEYS[2], KEYS[3]
local a = cjson.decode(ARGV[1])

local rec = redis.call('HMGET', job_key, 'state', 'gw', 'wait', 'id', 'tenant')
if rec[1] ~= a.expected then
  return 0
end
redis.call('HSET', job_key, 'state', a.state, 'finished', NOW, 'error', a.error,
  'status', a.status)
redis.call('ZREM', retry_scheduled, rec[4])
if a.state == 'dead' then
  -- A dead letter keeps its request (an operator may requeue it) for dead_ttl; it is no
  -- longer charged to its tenant, whose quota bounds live work.
  redis.call('EXPIRE', job_key, a.dead_ttl)
else
  redis.call('HDEL', job_key, 'req')
  redis.call('EXPIRE', job_key, rec[3] == '0' and a.job_ttl or a.result_ttl)
end
HOLD(rec[5], job_key, 0, 0)
redis.call('HINCRBY', stats, a.state, 1)
if rec[2] then
  redis.call('PUBLISH', a.reply_prefix .. rec[2], a.message)
end
return 1
