-- Hand a running job back (a worker shutting down, a stranded entry, or the scheduler taking
-- back what a dead or unregistered node held): settle the old stream entry and queue the job
-- again at once.
-- Two exceptions: a job whose client already received part of a streamed answer is failed
-- (a re-run would repeat that output), and a job that used up its attempts (a poison job
-- that takes down every node that runs it) goes to the retry inbox, where the scheduler's
-- RQ job dead-letters it. The attempt limit is the job's own (set at enqueue), so every
-- path that puts a job back enforces the same one.
-- Safe to run twice: a re-sent call answers the outcome of the first.
-- KEYS: 1 job record, 2 stream the old entry is in, 3 stream to add to, 4 queued counter,
--       5 doorbell, 6 stats, 7 retry inbox
-- ARGV: 1 group, 2 old entry id, 3 node expected to hold it ('' = any), 4 (unused),
--       5 reason, 6 doorbell cap, 7 attempt limit for records that carry none (0 = none),
--       8 reply channel prefix, 9 ttl (s) for wait=false jobs, 10 ttl for jobs a client
--       waited on, 11 error text when failing a streamed job, 12 its reply's JSON payload,
--       13 history line (JSON)
-- Returns 1 requeued, 2 failed (streamed), 3 sent to the retry inbox, 0 no longer held there.
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
local rec = redis.call('HMGET', KEYS[1], 'state', 'node', 'entry', 'id', 'streamed', 'attempts',
  'gw', 'wait', 'history', 'max_attempts', 'handed_back')
local mark = ARGV[2] .. ' '
if rec[11] and string.sub(rec[11], 1, #mark) == mark then
  return tonumber(string.sub(rec[11], #mark + 1))
end
if rec[1] ~= 'running' or (ARGV[3] ~= '' and rec[2] ~= ARGV[3]) or rec[3] ~= ARGV[2] then
  return 0
end
local history = rec[9] and (rec[9] .. '\n' .. ARGV[13]) or ARGV[13]
redis.call('HSET', KEYS[1], 'history', history, 'last_error', ARGV[5])
redis.call('HDEL', KEYS[1], 'node')
local function outcome(n)
  redis.call('HSET', KEYS[1], 'handed_back', ARGV[2] .. ' ' .. n)
  return n
end
if rec[5] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', NOW, 'error', ARGV[11],
    'status', '503')
  redis.call('EXPIRE', KEYS[1], tonumber(rec[8] == '0' and ARGV[9] or ARGV[10]))
  redis.call('HINCRBY', KEYS[6], 'failed', 1)
  if rec[7] then
    redis.call('PUBLISH', ARGV[8] .. rec[7], rec[4] .. ' 999999999 E ' .. ARGV[12])
  end
  return outcome(2)
end
local limit = tonumber(rec[10] or ARGV[7]) or 0
if limit > 0 and tonumber(rec[6] or '0') >= limit then
  redis.call('HSET', KEYS[1], 'state', 'retrying', 'retry_since', NOW)
  redis.call('RPUSH', KEYS[7], rec[4])
  return outcome(3)
end
local entry = redis.call('XADD', KEYS[3], '*', 'j', rec[4])
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', entry, 'requeued', NOW)
redis.call('INCR', KEYS[4])
redis.call('LPUSH', KEYS[5], '1')
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[6]) - 1)
redis.call('HINCRBY', KEYS[6], 'requeued', 1)
return outcome(1)
