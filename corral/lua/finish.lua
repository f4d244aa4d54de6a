-- Record a job's outcome, acknowledge its stream entry and answer its gateway, once.
-- Safe to run twice: a re-sent call finds the outcome it wrote and answers 1 again.
-- KEYS: 1 job record, 2 stream the entry came from, 3 stats, 4 the job's streamed-output list
-- ARGV: 1 group, 2 node id, 3 entry id, 4 final state, 5 (unused), 6 record ttl (s),
--       7 result (JSON, may be empty), 8 error message, 9 error status,
--       10 reply channel prefix, 11 message to publish (may be empty),
--       12 record ttl (s) for jobs a client waited on (their result was delivered live)
-- Returns 1 when this attempt settled the job, 0 when the job had already moved on
-- (cancelled, expired, or taken back from this node): then nothing is published.
redis.call('XACK', KEYS[2], ARGV[1], ARGV[3])
local rec = redis.call('HMGET', KEYS[1], 'state', 'node', 'entry', 'gw', 'wait')
if rec[2] ~= ARGV[2] or rec[3] ~= ARGV[3] then
  return 0
end
if rec[1] == ARGV[4] then
  return 1 -- this very call already ran (its reply was lost)
end
if rec[1] ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'finished', NOW)
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'result', ARGV[7])
end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[8], 'status', ARGV[9])
end
redis.call('EXPIRE', KEYS[1], tonumber(rec[5] == '0' and ARGV[6] or ARGV[12]))
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
if ARGV[11] ~= '' and rec[4] then
  redis.call('PUBLISH', ARGV[10] .. rec[4], ARGV[11])
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  -- Kept briefly so a gateway that lost its subscription can replay the whole answer.
  redis.call('RPUSH', KEYS[4], ARGV[11])
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[12]))
end
return 1
