-- Claim up to ARGV[8] jobs of one model, most urgent priority first, and mark them running.
-- Non-blocking on purpose: a multi-stream XREADGROUP would hand out COUNT entries per stream
-- and ignore BLOCK, so workers wait on the doorbell and then call this. One call claims as
-- many jobs as the worker has free slots, so a busy node pays one round trip per batch.
-- Safe to run twice: each call carries a receipt key; a call whose receipt exists (the same
-- call re-sent after a timeout) answers with the jobs it claimed the first time.
-- KEYS: 1..10 streams p0..p9, 11 queued counter, 12 doorbell, 13 stats, 14 live gateways,
--       15 this call's receipt
-- ARGV: 1 group, 2 consumer (node id), 3 receipt ttl (s), 4 job key prefix,
--       5 reply channel prefix, 6 record ttl (s) for a job that ends in the queue,
--       7 seconds without a heartbeat after which a gateway is gone (CORRAL_GATEWAY_TTL),
--       8 most jobs to claim (free slots), 9 the error an orphaned job ends with,
--       10 that error's reply payload (JSON)
-- Returns a list of {priority, entry id, job id, kind, request, stream flag, gateway id,
-- attempts, run timeout}, most urgent first; empty when nothing waits (the doorbell is
-- cleared then, so stale rings stop).
local group, consumer, now = ARGV[1], ARGV[2], NOW
local want = tonumber(ARGV[8] or '1')
local claimed = {}

-- The fields a claim reads (one list, so both readers agree on the positions).
local function read(jk)
  return redis.call('HMGET', jk, 'state', 'kind', 'req', 'stream', 'gw', 'deadline', 'wait',
    'node', 'entry', 'prio', 'attempts', 'run_timeout')
end

local receipt = redis.call('GET', KEYS[15])
if receipt then
  -- A re-sent call: answer with what the first one claimed, if this node still holds it.
  for jid in string.gmatch(receipt, '[^,]+') do
    local rec = read(ARGV[4] .. jid)
    if rec[1] == 'running' and rec[8] == consumer then
      claimed[#claimed + 1] = {tonumber(rec[10]), rec[9], jid, rec[2], rec[3], rec[4], rec[5],
        tonumber(rec[11]), rec[12] or '0'}
    end
  end
  return claimed
end

-- End a queued job without running it: record why, and tell its gateway with `reply`.
local function end_in_queue(jk, jid, gw, state, error, status, counter, reply)
  redis.call('HSET', jk, 'state', state, 'finished', now, 'error', error, 'status', status)
  redis.call('EXPIRE', jk, tonumber(ARGV[6]))
  redis.call('HINCRBY', KEYS[13], counter, 1)
  redis.call('PUBLISH', ARGV[5] .. gw, jid .. ' 0 E ' .. reply)
  return state
end

-- Take one delivered entry: mark its job running and add it to `claimed`, or settle the
-- entry when its job must not run.
local function take(i, entry)
  local eid, jid = entry[1], entry[2][2]
  redis.call('DECR', KEYS[11])
  local jk = ARGV[4] .. jid
  local rec = read(jk)
  local state, deadline = rec[1], tonumber(rec[6])
  if state == 'queued' and deadline and deadline > 0 and deadline < NOWN then
    -- Expired while waiting: never start it, and tell the waiting client why.
    state = end_in_queue(jk, jid, rec[5], 'expired', 'job expired before a node could start it',
      '408', 'expired', '{"error":"job expired before a node could start it","status":408}')
  end
  if state == 'queued' and rec[7] == '1' then
    -- Orphan: the client waits on a gateway that is gone, so nobody could get the answer.
    local seen = tonumber(redis.call('ZSCORE', KEYS[14], rec[5]) or '0')
    if seen < NOWN - tonumber(ARGV[7]) then
      -- Tell the gateway anyway: if it was only slow to heartbeat, its client gets an
      -- answer instead of waiting out its timeout. 503, not 499: that client did not go
      -- away, and should try again.
      state = end_in_queue(jk, jid, rec[5], 'cancelled', ARGV[9], '503', 'orphaned', ARGV[10])
    end
  end
  if state == 'queued' then
    local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HSET', jk, 'state', 'running', 'node', consumer, 'started', now, 'entry', eid)
    claimed[#claimed + 1] = {i - 1, eid, jid, rec[2], rec[3], rec[4], rec[5], attempts,
      rec[12] or '0'}
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
    redis.call('SET', KEYS[15], table.concat(ids, ','), 'EX', tonumber(ARGV[3]))
  end
  return claimed
end

for i = 1, 10 do
  while #claimed < want do
    local asked = want - #claimed
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
  if #claimed >= want then
    return done()
  end
end
redis.call('DEL', KEYS[12])
return done()
