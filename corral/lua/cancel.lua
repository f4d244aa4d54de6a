-- Cancel a job. A queued one is marked so no claim ever runs it; a running one is marked
-- and its node told to abort the Ollama request at once.
-- Safe to run twice: each call carries a token, and a re-sent call answers the state the
-- job was in when the first one ran.
-- ARGV: 1 named arguments (corral.scripts.Cancel)
-- Returns the state the job was in (false when there is no such job).
local job_key, stats = KEYS[1], KEYS[2]
local a = cjson.decode(ARGV[1])

local rec = redis.call('HMGET', job_key, 'state', 'node', 'gw', 'wait', 'cancel_token', 'was',
  'tenant', 'model')
local state = rec[1]
if not state then
  return false
end
if rec[5] == a.token and rec[6] then
  return rec[6]
end
if state == 'queued' or state == 'retrying' or state == 'running' then
  redis.call('HSET', job_key, 'state', a.state, 'finished', NOW, 'error', a.reason,
    'status', a.status, 'cancel_token', a.token, 'was', state)
  redis.call('EXPIRE', job_key, rec[4] == '0' and a.job_ttl or a.result_ttl)
  redis.call('HDEL', job_key, 'req')
  HOLD(rec[7], job_key, 0, 0)
  if state == 'queued' then
    -- Leave the queue count now, not when a claim reaches the entry (which then settles
    -- it without counting it again): a burst of cancelled or timed-out requests must not
    -- keep the queue full.
    redis.call('DECR', a.queue_prefix .. '{' .. rec[8] .. '}:n')
    redis.call('HSET', job_key, 'uncounted', '1')
  end
  redis.call('HINCRBY', stats, a.state, 1)
  if state == 'running' and rec[2] then
    redis.call('PUBLISH', a.cancel_prefix .. rec[2], a.job_id)
  end
  if rec[3] then
    redis.call('PUBLISH', a.reply_prefix .. rec[3], a.message)
  end
end
return state
