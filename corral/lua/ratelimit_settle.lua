-- Settle a charge of ratelimit.lua: lower what one admitted request was charged to its
-- token limits to what it used, keeping the charge's place (time) in each window.
-- KEYS: for entry i, 2i-1 the log and 2i the sum of one token limit
-- ARGV: 1 named arguments (corral.ratelimit.Settle)
-- Returns the tokens given back, in all.
local a = cjson.decode(ARGV[1])
local back = 0
for i = 1, #a.entries do
  local log, sum_key = KEYS[2 * i - 1], KEYS[2 * i]
  local entry = a.entries[i]  -- {index in the charge, cost charged}
  local old = a.member .. ':' .. entry[1] .. ':' .. entry[2]
  local score = redis.call('ZSCORE', log, old)
  local used = math.min(entry[2], a.used)
  if score and used < entry[2] then
    redis.call('ZREM', log, old)
    if used > 0 then
      redis.call('ZADD', log, score, a.member .. ':' .. entry[1] .. ':' .. used)
    end
    if redis.call('EXISTS', sum_key) == 1 then
      local left = redis.call('DECRBY', sum_key, entry[2] - used)
      if left < 0 then redis.call('SET', sum_key, 0, 'KEEPTTL') end
    end
    back = back + entry[2] - used
  end
end
return back
