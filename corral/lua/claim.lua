-- Claim up to a.want jobs of one model, most urgent priority first, and mark them running.
-- Non-blocking on purpose: a multi-stream XREADGROUP would hand out COUNT entries per stream
-- and ignore BLOCK, so workers wait on the doorbell and then call this. One call claims as
-- many jobs as the worker has free slots, so a busy node pays one round trip per batch.
-- Safe to run twice: each call carries a receipt key; a call whose receipt exists (the same
-- call re-sent after a timeout) answers with the jobs it claimed the first time.
-- KEYS: 1..10 the model's streams p0..p9, then the named ones below
-- ARGV: 1 named arguments (corral.scripts.Claim)
-- Returns a list of {priority, entry id, job id, kind, request, stream flag, gateway id,
-- attempts, run timeout, seconds it waited in the queue (text)}, most urgent first; empty
-- when nothing waits (the doorbell is cleared then, so stale rings stop). With a.min_age > 0
-- only entries that waited that long are claimed, and a last element {'defer', ms} says when
-- the next younger one will have.
local queued_count, doorbell, stats, gateways, receipt_key =
  KEYS[11], KEYS[12], KEYS[13], KEYS[14], KEYS[15]
local a = cjson.decode(ARGV[1])
local group, consumer = a.group, a.consumer
local claimed = {}

-- The fields a claim reads (one list, so both readers agree on the positions).
local function read(jk)
  return redis.call('HMGET', jk, 'state', 'kind', 'req', 'stream', 'gw', 'deadline', 'wait',
    'node', 'entry', 'prio', 'attempts', 'run_timeout', 'created', 'started',
    'requeued')
end

-- Seconds from (re)enqueue to claim, as text (a Lua number would reach Python truncated).
local function waited(created, started)
  local c, s = tonumber(created), tonumber(started)
  if not c or not s then
    return '0'
  end
  return string.format('%.6f', math.max(s - c, 0))
end

local receipt = redis.call('GET', receipt_key)
if receipt then
  -- A re-sent call: answer with what the first one claimed, if this node still holds it.
  for jid in string.gmatch(receipt, '[^,]+') do
    local rec = read(a.job_prefix .. jid)
    if rec[1] == 'running' and rec[8] == consumer then
      claimed[#claimed + 1] = {tonumber(rec[10]), rec[9], jid, rec[2], rec[3], rec[4], rec[5],
        tonumber(rec[11]), rec[12] or '0', waited(rec[15] or rec[13], rec[14])}
    end
  end
  return claimed
end

-- End a queued job without running it, as `ending` (a corral.scripts.Ending) says, and
-- tell its gateway: the message is the job id followed by the tail Python built.
local function end_in_queue(jk, jid, gw, ending)
  redis.call('HSET', jk, 'state', ending.state, 'finished', NOW, 'error', ending.error,
    'status', ending.status)
  redis.call('EXPIRE', jk, a.ended_ttl)
  -- [memory] the request of a job that ends here is dropped and no longer charged
  redis.call('HDEL', jk, 'req')
  HOLD(redis.call('HGET', jk, 'tenant'), jk, 0, 0)
  redis.call('HINCRBY', stats, ending.counter, 1)
  redis.call('PUBLISH', a.reply_prefix .. gw, jid .. ending.reply)
  return ending.state
end

-- Take one delivered entry: mark its job running and add it to `claimed`, or settle the
-- entry when its job must not run.
local function take(i, entry)
  local eid, jid = entry[1], entry[2][2]
  local jk = a.job_prefix .. jid
  -- [memory] a job cancelled while queued already left the count (cancel.lua)
  if redis.call('HEXISTS', jk, 'uncounted') == 0 then
    redis.call('DECR', queued_count)
  end
  local rec = read(jk)
  local state, deadline = rec[1], tonumber(rec[6])
  if state == 'queued' and deadline and deadline > 0 and deadline < NOWN then
    -- Expired while waiting: never start it, and tell the waiting client why.
    state = end_in_queue(jk, jid, rec[5], a.expired)
  end
  if state == 'queued' and rec[7] == '1' then
    -- Orphan: the client waits on a gateway that is gone, so nobody could get the answer.
    local seen = tonumber(redis.call('ZSCORE', gateways, rec[5]) or '0')
    if seen < NOWN - a.gateway_ttl then
      -- Tell the gateway anyway: if it was only slow to heartbeat, its client gets an
      -- answer instead of waiting out its timeout (503, not 499: that client did not go
      -- away, and should try again).
      state = end_in_queue(jk, jid, rec[5], a.orphaned)
    end
  end
  if state == 'queued' then
    local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HSET', jk, 'state', 'running', 'node', consumer, 'started', NOW, 'entry', eid)
    claimed[#claimed + 1] = {i - 1, eid, jid, rec[2], rec[3], rec[4], rec[5], attempts,
      rec[12] or '0', waited(rec[15] or rec[13], NOW)}
  else
    -- Cancelled, expired or vanished while queued: nothing to run, so settle the entry.
    redis.call('XACK', KEYS[i], group, eid)
  end
end

local function done()
  if #claimed > 0 then
    local ids = {}
    for n, job in ipairs(claimed) do
      ids[n] = job[3]
    end
    redis.call('SET', receipt_key, table.concat(ids, ','), 'EX', a.receipt_ttl)
  end
  return claimed
end

-- How many of the next undelivered entries of stream i have waited min_age seconds (entry
-- ids are Redis's own milliseconds), and how long until the next one has, when it has not.
-- A node that defers to better placed nodes claims only jobs that waited that long.
local defer_ms = nil
local function old_enough(i, asked)
  local groups = redis.call('XINFO', 'GROUPS', KEYS[i])
  local last = '0-0'
  for _, g in ipairs(groups) do
    for k = 1, #g, 2 do
      if g[k] == 'name' and g[k + 1] ~= group then
        break
      end
      if g[k] == 'last-delivered-id' then
        last = g[k + 1]
      end
    end
  end
  local entries = redis.call('XRANGE', KEYS[i], '(' .. last, '+', 'COUNT', asked)
  local cutoff = NOWN * 1000 - a.min_age * 1000
  local n = 0
  for _, entry in ipairs(entries) do
    local ms = tonumber(string.match(entry[1], '^(%d+)'))
    if ms > cutoff then
      local wait = ms - cutoff
      if defer_ms == nil or wait < defer_ms then
        defer_ms = wait
      end
      break
    end
    n = n + 1
  end
  return n
end

for i = 1, 10 do
  while #claimed < a.want do
    local asked = a.want - #claimed
    if a.min_age > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
      asked = old_enough(i, asked)
      if asked == 0 then
        break
      end
    end
    local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', asked,
      'STREAMS', KEYS[i], '>')
    if type(r) ~= 'table' or r.err or r[1] == nil then
      break
    end
    local entries = r[1][2]
    for _, entry in ipairs(entries) do
      take(i, entry)
    end
    if #entries < asked then
      break -- this stream is empty now
    end
  end
  if #claimed >= a.want then
    return done()
  end
end
if defer_ms ~= nil then
  -- Jobs wait that this node left to others: keep a ring for a node blocked on the
  -- doorbell (this one waits out defer_ms instead), and say when to look again.
  if redis.call('LLEN', doorbell) == 0 then
    redis.call('RPUSH', doorbell, '1')
  end
  local reply = done()
  reply[#reply + 1] = {'defer', math.ceil(defer_ms)}
  return reply
end
redis.call('DEL', doorbell)
return done()
