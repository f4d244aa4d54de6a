-- Sliding-window rate limits: check every limit a request falls under, and charge them all
-- only if all allow it, in one step on Redis's clock, so any number of gateways share them
-- exactly. Each limit is a sorted set of charges (member "<id>:<cost>", score its time in
-- ms) and a string holding their sum; charges older than the window are dropped first.
-- KEYS: for limit i, 2i-1 its log and 2i its sum
-- ARGV: 1 named arguments (corral.ratelimit.Charge)
-- Returns {allowed (1/0), retry_ms (-1: the cost exceeds the limit), limit, remaining,
-- reset_ms} where the last three describe the tightest limit.
local a = cjson.decode(ARGV[1])
local now = math.floor(NOWN * 1000)
local window = a.window_ms
local cutoff = now - window

local function cost_of(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

local allowed, retry = 1, 0
local tight_limit, tight_remaining, tight_reset = 0, nil, 0
for i = 1, #a.limits do
  local log, sum_key = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, cost = a.limits[i], a.costs[i]
  local sum = tonumber(redis.call('GET', sum_key) or '0')
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #old > 0 then
    for _, member in ipairs(old) do
      sum = sum - cost_of(member)
    end
    if sum < 0 then sum = 0 end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    redis.call('SET', sum_key, sum, 'KEEPTTL')
  end
  local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  local reset = oldest[2] and (tonumber(oldest[2]) + window - now) or 0
  if sum + cost > limit then
    allowed = 0
    local wait = -1
    if cost <= limit then
      local need, freed = sum + cost - limit, 0
      local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + cost_of(entries[j])
        if freed >= need then
          wait = tonumber(entries[j + 1]) + window - now
          break
        end
      end
    end
    if wait < 0 or (retry >= 0 and wait > retry) then retry = wait end
    tight_limit, tight_remaining, tight_reset = limit, 0, reset
  elseif allowed == 1 then
    local remaining = limit - sum - cost
    if tight_remaining == nil or remaining < tight_remaining then
      tight_limit, tight_remaining, tight_reset = limit, remaining, reset
    end
  end
end

if allowed == 1 then
  for i = 1, #a.limits do
    local cost = a.costs[i]
    if cost > 0 then
      local log, sum_key = KEYS[2 * i - 1], KEYS[2 * i]
      redis.call('ZADD', log, now, a.member .. ':' .. i .. ':' .. cost)
      redis.call('INCRBY', sum_key, cost)
      redis.call('PEXPIRE', log, window)
      redis.call('PEXPIRE', sum_key, window)
    end
  end
  if tight_reset == 0 then tight_reset = window end
end
return {allowed, retry, tight_limit, tight_remaining or 0, tight_reset}
