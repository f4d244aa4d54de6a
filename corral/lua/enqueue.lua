-- Store a job record and add its id to the (model, priority) stream, atomically.
-- KEYS: 1 job record, 2 stream, 3 queued counter, 4 doorbell, 5 stats, 6 set of known models
-- ARGV: 1 group, 2 max queued for the model, 3 doorbell cap, 4 stream entry field value (job id),
--       5 model name, 6.. field/value pairs of the job record
-- Returns the model's queued count after the add, or -1 when the queue is full.
local queued = tonumber(redis.call('GET', KEYS[3]) or '0')
if queued >= tonumber(ARGV[2]) then
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('SADD', KEYS[6], ARGV[5])
local entry = redis.call('XADD', KEYS[2], '*', 'j', ARGV[4])
redis.call('HSET', KEYS[1], 'entry', entry)
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[3]) - 1)
redis.call('HINCRBY', KEYS[5], 'enqueued', 1)
return redis.call('INCR', KEYS[3])
