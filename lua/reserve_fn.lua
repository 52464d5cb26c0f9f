-- The earliest call start an account's budget allows: a sliding log, shared by every replica,
-- timed by Redis's clock. Call n starts at least `window` after call n - `limit`; every caller
-- knows at once when it may call, or that its deadline comes first (then nothing is reserved).
-- A start further away than the horizon is not booked yet, only told: a replica that dies
-- leaves at most a horizon of the account's budget booked and unused. Shared by `reserve.lua`
-- and `claim.lua`, each of which is this file followed by its own.
--
-- log      the account's log: a sorted set of reserved starts (µs since the epoch)
-- pause    the account's pause: no start before this (µs), set after a 429
-- wire     the command's "a call may be on the wire" mark
-- a[1]     limit            a[2] window (µs)
-- a[3]     deadline, µs from now (-1: none)
-- a[4]     the start's member: the same each time one start is asked again
-- a[5]     the mark's value (the claimant)   a[6] the mark's lifetime (ms)
-- a[7]     the horizon (µs)
-- Returns {1, delay µs} when reserved, {0, delay µs} when the deadline comes first, and
-- {2, delay µs} when the start is beyond the horizon: ask again closer to it.
local function reserve(log, pause, wire, a)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local limit = tonumber(a[1])
  local window = tonumber(a[2])
  local deadline = tonumber(a[3])

  redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
  -- Asked again for the same start (its answer was lost, or not acknowledged): it is booked
  -- anew, not twice.
  redis.call('ZREM', log, a[4])
  local slot = now
  local paused = tonumber(redis.call('GET', pause) or '0')
  if paused > slot then slot = paused end
  local n = redis.call('ZCARD', log)
  if n >= limit then
    local nth = redis.call('ZRANGE', log, n - limit, n - limit, 'WITHSCORES')
    local free = tonumber(nth[2]) + window
    if free > slot then slot = free end
  end
  if n > 0 then
    local last = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
    local l = tonumber(last[2])
    if l > slot then slot = l end
  end
  local delay = slot - now
  if deadline >= 0 and delay > deadline then
    return {0, delay}
  end
  if delay > tonumber(a[7]) then
    return {2, delay}
  end
  redis.call('ZADD', log, slot, a[4])
  redis.call('PEXPIRE', log, math.floor((delay + window) / 1000) + 1000)
  redis.call('SET', wire, a[5], 'PX', a[6])
  return {1, delay}
end
