-- Cancel a job. A queued one is marked so no claim ever runs it; a running one is marked
-- and its node told to abort the Ollama request at once.
-- Safe to run twice: each call carries a token, and a re-sent call answers the state the
-- job was in when the first one ran.
-- KEYS: 1 job record, 2 stats
-- ARGV: 1 job id, 2 call token, 3 record ttl (s), 4 reason, 5 cancel channel prefix,
--       6 reply channel prefix, 7 message for the waiting gateway,
--       8 record ttl (s) for jobs a client waited on, 9 final state (cancelled or expired),
--       10 status to record
-- Returns the state the job was in (false when there is no such job).
local rec = redis.call('HMGET', KEYS[1], 'state', 'node', 'gw', 'wait', 'cancel_token', 'was')
local state = rec[1]
if not state then
  return false
end
if rec[5] == ARGV[2] and rec[6] then
  return rec[6]
end
if state == 'queued' or state == 'retrying' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', ARGV[9], 'finished', NOW, 'error', ARGV[4],
    'status', ARGV[10], 'cancel_token', ARGV[2], 'was', state)
  redis.call('EXPIRE', KEYS[1], tonumber(rec[4] == '0' and ARGV[3] or ARGV[8]))
  redis.call('HINCRBY', KEYS[2], ARGV[9], 1)
  if state == 'running' and rec[2] then
    redis.call('PUBLISH', ARGV[5] .. rec[2], ARGV[1])
  end
  if rec[3] then
    redis.call('PUBLISH', ARGV[6] .. rec[3], ARGV[7])
  end
end
return state
