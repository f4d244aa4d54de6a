-- Store a job record and add its id to the (model, priority) stream, atomically.
-- Safe to run twice: redis-py re-sends a command after a timeout, and a stalled Redis may
-- have run the first one, so a job that already exists is left as it is.
-- KEYS: 1 job record, 2 stream, 3 queued counter, 4 doorbell, 5 stats, 6 set of known models
-- ARGV: 1 group, 2 max queued for the model, 3 doorbell cap, 4 job id, 5 model name,
--       6 kind, 7 priority, 8 gateway id, 9 stream flag, 10 wait flag, 11 request JSON,
--       12 seconds the job may wait to start (0: no limit), 13 attempts it may use,
--       14 seconds one attempt may run (0: no limit)
-- (Field names live here, not in ARGV: fewer arguments to pack on every request.)
-- Returns the model's queued count after the add, or -1 when the queue is full.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return tonumber(redis.call('GET', KEYS[3]) or '0')
end
local queued = tonumber(redis.call('GET', KEYS[3]) or '0')
if queued >= tonumber(ARGV[2]) then
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
end
local wait_limit = tonumber(ARGV[12])
local deadline = wait_limit > 0 and string.format('%.6f', NOWN + wait_limit) or '0'
local entry = redis.call('XADD', KEYS[2], '*', 'j', ARGV[4])
redis.call('HSET', KEYS[1], 'id', ARGV[4], 'kind', ARGV[6], 'model', ARGV[5], 'prio', ARGV[7],
  'state', 'queued', 'gw', ARGV[8], 'stream', ARGV[9], 'wait', ARGV[10], 'req', ARGV[11],
  'created', NOW, 'deadline', deadline, 'attempts', 0, 'max_attempts', ARGV[13],
  'run_timeout', ARGV[14], 'entry', entry)
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[3]) - 1)
redis.call('HINCRBY', KEYS[5], 'enqueued', 1)
return redis.call('INCR', KEYS[3])
