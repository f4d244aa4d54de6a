-- A running attempt failed in a way another attempt may fix (node error, 5xx, timeout,
-- garbage): settle its entry, record why, and hand the job to the scheduler, which
-- schedules the retry through RQ with backoff (or dead-letters it, attempts used up).
-- Safe to run twice: a re-sent call finds the job already waiting for this retry.
-- ARGV: 1 named arguments (corral.scripts.Retry)
-- Returns 1 when the job now waits for its retry, 0 when it had already moved on.
local job_key, stream, retry_inbox, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local a = cjson.decode(ARGV[1])

redis.call('XACK', stream, a.group, a.entry)
local rec = redis.call('HMGET', job_key, 'state', 'node', 'entry', 'id', 'history', 'retry_of')
if rec[1] == 'retrying' and rec[6] == a.entry then
  return 1
end
if rec[1] ~= 'running' or rec[2] ~= a.node or rec[3] ~= a.entry then
  return 0
end
local history = rec[5] and (rec[5] .. '\n' .. a.history) or a.history
redis.call('HSET', job_key, 'state', 'retrying', 'last_error', a.error, 'history', history,
  'retry_since', NOW, 'retry_of', a.entry)
redis.call('HDEL', job_key, 'node')
redis.call('RPUSH', retry_inbox, rec[4])
redis.call('HINCRBY', stats, 'retried', 1)
return 1
