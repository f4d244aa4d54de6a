-- Hand a running job back (a worker shutting down, a stranded entry, or the scheduler taking
-- back what a dead or unregistered node held): settle the old stream entry and queue the job
-- again at once.
-- Two exceptions: a job whose client already received part of a streamed answer is failed
-- (a re-run would repeat that output) unless a.resume (the next node then continues the
-- answer from where the client is), and a job that used up its attempts (a poison job
-- that takes down every node that runs it) goes to the retry inbox, where the scheduler's
-- RQ job dead-letters it. The attempt limit is the job's own (set at enqueue), so every
-- path that puts a job back enforces the same one.
-- Safe to run twice: a re-sent call answers the outcome of the first.
-- ARGV: 1 named arguments (corral.scripts.Requeue)
-- Returns 1 requeued, 2 failed (streamed), 3 sent to the retry inbox, 0 no longer held there.
local job_key, old_stream, stream, queued_count, doorbell, stats, retry_inbox =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local a = cjson.decode(ARGV[1])

redis.call('XACK', old_stream, a.group, a.entry)
local rec = redis.call('HMGET', job_key, 'state', 'node', 'entry', 'id', 'streamed', 'attempts',
  'gw', 'wait', 'history', 'max_attempts', 'handed_back', 'tenant')
local mark = a.entry .. ' '
if rec[11] and string.sub(rec[11], 1, #mark) == mark then
  return tonumber(string.sub(rec[11], #mark + 1))
end
if rec[1] ~= 'running' or (a.node ~= '' and rec[2] ~= a.node) or rec[3] ~= a.entry then
  return 0
end
local history = rec[9] and (rec[9] .. '\n' .. a.history) or a.history
redis.call('HSET', job_key, 'history', history, 'last_error', a.reason)
redis.call('HDEL', job_key, 'node')
local function outcome(n)
  redis.call('HSET', job_key, 'handed_back', a.entry .. ' ' .. n)
  return n
end
if rec[5] == '1' and not a.resume then
  redis.call('HSET', job_key, 'state', 'failed', 'finished', NOW, 'error', a.streamed_error,
    'status', a.streamed_status)
  redis.call('EXPIRE', job_key, rec[8] == '0' and a.job_ttl or a.result_ttl)
  redis.call('HDEL', job_key, 'req')
  HOLD(rec[12], job_key, 0, 0)
  redis.call('HINCRBY', stats, 'failed', 1)
  if rec[7] then
    redis.call('PUBLISH', a.reply_prefix .. rec[7], a.streamed_message)
  end
  return outcome(2)
end
local limit = tonumber(rec[10]) or a.max_attempts
if limit > 0 and tonumber(rec[6] or '0') >= limit then
  redis.call('HSET', job_key, 'state', 'retrying', 'retry_since', NOW)
  redis.call('RPUSH', retry_inbox, rec[4])
  return outcome(3)
end
local entry = redis.call('XADD', stream, '*', 'j', rec[4])
redis.call('HSET', job_key, 'state', 'queued', 'entry', entry, 'requeued', NOW)
redis.call('INCR', queued_count)
redis.call('LPUSH', doorbell, '1')
redis.call('LTRIM', doorbell, 0, a.doorbell_cap - 1)
redis.call('HINCRBY', stats, 'requeued', 1)
return outcome(1)
