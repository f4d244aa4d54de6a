-- Store a job record and add its id to the (model, priority) stream, atomically.
-- Safe to run twice: redis-py re-sends a command after a timeout, and a stalled Redis may
-- have run the first one, so a job that already exists is left as it is.
-- ARGV: 1 named arguments (corral.scripts.Enqueue), 2 the request body (stored as it is)
-- Returns the model's queued count after the add, -1 when the queue is full, or -2 when the
-- tenant's stored bytes would pass its quota (nothing stored either way).
local job_key, stream, queued_count, doorbell, stats, models =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local a = cjson.decode(ARGV[1])
local request = ARGV[2]

if redis.call('EXISTS', job_key) == 1 then
  return tonumber(redis.call('GET', queued_count) or '0')
end
local queued = tonumber(redis.call('GET', queued_count) or '0')
if queued >= a.max_queue then
  return -1
end
if a.tenant ~= '' then
  local held = SWEEP(a.tenant, NOWN)
  if a.quota > 0 and held + #request > a.quota then
    return -2
  end
end
if redis.call('EXISTS', stream) == 0 then
  redis.call('XGROUP', 'CREATE', stream, a.group, '0', 'MKSTREAM')
end
local deadline = a.wait_limit > 0 and string.format('%.6f', NOWN + a.wait_limit) or '0'
local entry = redis.call('XADD', stream, '*', 'j', a.job_id)
redis.call('HSET', job_key, 'id', a.job_id, 'kind', a.kind, 'model', a.model, 'prio', a.priority,
  'state', 'queued', 'gw', a.gateway_id, 'stream', a.stream and '1' or '0',
  'wait', a.wait and '1' or '0', 'req', request, 'created', NOW, 'deadline', deadline,
  'attempts', 0, 'max_attempts', a.max_attempts, 'run_timeout', a.run_timeout, 'entry', entry,
  'owner', a.owner, 'prio_asked', a.priority_asked, 'tenant', a.tenant)
HOLD(a.tenant, job_key, #request, 0)
redis.call('SADD', models, a.model)
redis.call('LPUSH', doorbell, '1')
redis.call('LTRIM', doorbell, 0, a.doorbell_cap - 1)
redis.call('HINCRBY', stats, 'enqueued', 1)
return redis.call('INCR', queued_count)
