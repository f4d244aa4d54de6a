-- A running attempt failed in a way another attempt may fix (node error, 5xx, timeout,
-- garbage): settle its entry, record why, and hand the job to the scheduler, which
-- schedules the retry through RQ with backoff (or dead-letters it, attempts used up).
-- Safe to run twice: a re-sent call finds the job already waiting for this retry.
-- KEYS: 1 job record, 2 stream the entry came from, 3 retry inbox (list), 4 stats
-- ARGV: 1 group, 2 node id, 3 entry id, 4 (unused), 5 error, 6 history line (JSON)
-- Returns 1 when the job now waits for its retry, 0 when it had already moved on.
redis.call('XACK', KEYS[2], ARGV[1], ARGV[3])
local rec = redis.call('HMGET', KEYS[1], 'state', 'node', 'entry', 'id', 'history', 'retry_of')
if rec[1] == 'retrying' and rec[6] == ARGV[3] then
  return 1
end
if rec[1] ~= 'running' or rec[2] ~= ARGV[2] or rec[3] ~= ARGV[3] then
  return 0
end
local history = rec[5] and (rec[5] .. '\n' .. ARGV[6]) or ARGV[6]
redis.call('HSET', KEYS[1], 'state', 'retrying', 'last_error', ARGV[5], 'history', history,
  'retry_since', NOW, 'retry_of', ARGV[3])
redis.call('HDEL', KEYS[1], 'node')
redis.call('RPUSH', KEYS[3], rec[4])
redis.call('HINCRBY', KEYS[4], 'retried', 1)
return 1
