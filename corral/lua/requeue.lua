-- Hand a running job back to its queue (a worker shutting down, or the scheduler taking
-- back what a dead node held): settle the old stream entry, add a new one, ring the bell.
-- A job whose client already received part of a streamed answer is failed instead (a re-run
-- would repeat that output), and so is one that has used up its attempts (a poison job that
-- takes down every node that runs it).
-- KEYS: 1 job record, 2 stream the old entry is in, 3 stream to add to, 4 queued counter,
--       5 doorbell, 6 stats
-- ARGV: 1 group, 2 old entry id, 3 node expected to hold it ('' = any), 4 now, 5 reason,
--       6 doorbell cap, 7 max attempts (0 = no limit), 8 reply channel prefix,
--       9 record ttl (s) for wait=false jobs, 10 record ttl for jobs a client waited on
-- Returns 1 when requeued, 2 when failed for good, 0 when the job was no longer running there.
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
local rec = redis.call('HMGET', KEYS[1], 'state', 'node', 'entry', 'id', 'streamed', 'attempts',
  'gw', 'wait')
if rec[1] ~= 'running' or (ARGV[3] ~= '' and rec[2] ~= ARGV[3]) or rec[3] ~= ARGV[2] then
  return 0
end
local limit = tonumber(ARGV[7])
local give_up = nil
if rec[5] == '1' then
  give_up = ARGV[5] .. ' after part of the answer was streamed'
elseif limit > 0 and tonumber(rec[6] or '0') >= limit then
  give_up = ARGV[5] .. '; gave up after ' .. rec[6] .. ' attempts'
end
if give_up then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', ARGV[4], 'error', give_up,
    'status', '503')
  redis.call('EXPIRE', KEYS[1], tonumber(rec[8] == '0' and ARGV[9] or ARGV[10]))
  redis.call('HINCRBY', KEYS[6], 'failed', 1)
  if rec[7] then
    redis.call('PUBLISH', ARGV[8] .. rec[7], rec[4] .. ' 999999999 E ' ..
      cjson.encode({error = give_up, status = 503}))
  end
  return 2
end
local entry = redis.call('XADD', KEYS[3], '*', 'j', rec[4])
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', entry, 'requeued', ARGV[4],
  'last_error', ARGV[5])
redis.call('HDEL', KEYS[1], 'node')
redis.call('INCR', KEYS[4])
redis.call('LPUSH', KEYS[5], '1')
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[6]) - 1)
redis.call('HINCRBY', KEYS[6], 'requeued', 1)
return 1
