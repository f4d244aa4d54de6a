-- Record a job's outcome, acknowledge its stream entry and answer its gateway, once.
-- Safe to run twice: a re-sent call finds the outcome it wrote and answers 1 again.
-- ARGV: 1 named arguments (corral.scripts.Finish), 2 the result (JSON, may be empty),
--       3 the message to publish (may be empty)
-- Returns 1 when this attempt settled the job, 0 when the job had already moved on
-- (cancelled, expired, or taken back from this node): then nothing is published.
local job_key, stream, stats, output = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local a = cjson.decode(ARGV[1])
local result, message = ARGV[2], ARGV[3]

redis.call('XACK', stream, a.group, a.entry)
local rec = redis.call('HMGET', job_key, 'state', 'node', 'entry', 'gw', 'wait', 'tenant',
  'replay_cut')
if rec[2] ~= a.node or rec[3] ~= a.entry then
  return 0
end
if rec[1] == a.state then
  return 1 -- this very call already ran (its reply was lost)
end
if rec[1] ~= 'running' then
  return 0
end
redis.call('HSET', job_key, 'state', a.state, 'finished', NOW)
if result ~= '' then
  redis.call('HSET', job_key, 'result', result)
end
if a.error ~= '' then
  redis.call('HSET', job_key, 'error', a.error, 'status', a.status)
end
-- The request can no longer be retried: only the outcome is kept, and charged.
redis.call('HDEL', job_key, 'req')
local ttl = rec[5] == '0' and a.job_ttl or a.result_ttl
redis.call('EXPIRE', job_key, ttl)
HOLD(rec[6], job_key, #result, NOWN + ttl)
redis.call('HINCRBY', stats, a.state, 1)
if message ~= '' and rec[4] then
  redis.call('PUBLISH', a.reply_prefix .. rec[4], message)
end
if message ~= '' and not rec[7] and redis.call('EXISTS', output) == 1 then
  -- (A replay list the worker stopped at its cap gets no final message either: its
  -- readers cannot relay the chunks past the cap, and end their answers with an error.)
  -- Kept briefly so a gateway that lost its subscription can replay the whole answer.
  redis.call('RPUSH', output, message)
  redis.call('EXPIRE', output, a.result_ttl)
end
return 1
