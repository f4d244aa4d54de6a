-- Store one cached answer and keep the cache's byte count, expiry index and budget right.
-- Best effort by design: the caller ignores any failure (the answer already went out).
-- KEYS: 1 the entry, 2 the expiry index (zset), 3 the sizes (hash), 4 the stats (hash)
-- ARGV: 1 named arguments (corral.gateway.cache_store.CachePut), 2 the entry's bytes
-- Returns the number of entries evicted to make room.
local entry, index, sizes, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local a = cjson.decode(ARGV[1])
local value = ARGV[2]
local size = string.len(value)
local now_ms = math.floor(NOWN * 1000)

-- First a write that Redis refuses at maxmemory (noeviction): a script that has written
-- nothing yet is stopped by the OOM error, so a full Redis gets no cache entries at all.
redis.call('HINCRBY', stats, 'writes', 1)

local function forget(key)
  local old = tonumber(redis.call('HGET', sizes, key) or '0')
  if old > 0 then
    redis.call('HINCRBY', stats, 'bytes', -old)
  end
  redis.call('HDEL', sizes, key)
  redis.call('ZREM', index, key)
end

-- Entries that expired on their own no longer use memory: stop counting them.
local expired = redis.call('ZRANGEBYSCORE', index, '-inf', now_ms, 'LIMIT', 0, a.sweep)
for _, key in ipairs(expired) do
  forget(key)
end
forget(entry) -- a rewrite replaces the entry's old size

local evicted = 0
local total = tonumber(redis.call('HGET', stats, 'bytes') or '0')
while total + size > a.cap and evicted < a.max_evict do
  local oldest = redis.call('ZRANGE', index, 0, 0)
  if #oldest == 0 then
    break
  end
  redis.call('DEL', oldest[1])
  forget(oldest[1])
  evicted = evicted + 1
  total = tonumber(redis.call('HGET', stats, 'bytes') or '0')
end
if evicted > 0 then
  redis.call('HINCRBY', stats, 'evictions', evicted)
end
if total + size > a.cap then
  return evicted -- still no room (only possible past max_evict): skip this entry
end
redis.call('SET', entry, value, 'PX', a.ttl_ms)
redis.call('ZADD', index, now_ms + a.ttl_ms, entry)
redis.call('HSET', sizes, entry, size)
redis.call('HINCRBY', stats, 'bytes', size)
return evicted
