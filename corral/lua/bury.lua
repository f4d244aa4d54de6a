-- End a job that cannot go on: its retries are used up (dead), or its deadline passed while
-- it waited for a retry (expired). Tells its waiting gateway, if any.
-- Safe to run twice: the state check refuses a job that is no longer waiting.
-- KEYS: 1 job record, 2 stats, 3 scheduled retries (sorted set)
-- ARGV: 1 new state ('dead' or 'expired'), 2 (unused), 3 error, 4 status, 5 reply channel
--       prefix, 6 ttl (s) for wait=false jobs, 7 ttl (s) for jobs a client waited on,
--       8 expected current state, 9 the error reply's JSON payload
-- Returns 1 when done, 0 when the job was no longer in the expected state.
local rec = redis.call('HMGET', KEYS[1], 'state', 'gw', 'wait', 'id')
if rec[1] ~= ARGV[8] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished', NOW, 'error', ARGV[3],
  'status', ARGV[4])
redis.call('ZREM', KEYS[3], rec[4])
if ARGV[1] ~= 'dead' then
  -- A dead job stays until the dead-letter queue is purged, so it can be requeued.
  redis.call('EXPIRE', KEYS[1], tonumber(rec[3] == '0' and ARGV[6] or ARGV[7]))
end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if rec[2] then
  redis.call('PUBLISH', ARGV[5] .. rec[2], rec[4] .. ' 999999999 E ' .. ARGV[9])
end
return 1
