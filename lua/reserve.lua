-- Reserves the earliest call start an account's budget allows: a sliding log, shared by every
-- replica, timed by Redis's clock. Call n starts at least `window` after call n - `limit`;
-- every caller knows at once when it may call, or that its deadline comes first (then nothing
-- is reserved). A start further away than the horizon is not booked yet, only told: a replica
-- that dies leaves at most a horizon of the account's budget booked and unused.
--
-- KEYS[1]  the account's log: a sorted set of reserved starts (µs since the epoch)
-- KEYS[2]  the account's pause: no start before this (µs), set after a 429
-- KEYS[3]  the command's "a call may be on the wire" mark
-- ARGV[1]  limit            ARGV[2] window (µs)
-- ARGV[3]  deadline, µs from now (-1: none)
-- ARGV[4]  a unique member for this start
-- ARGV[5]  the mark's value (the claimant)   ARGV[6] the mark's lifetime (ms)
-- ARGV[7]  the horizon (µs)
-- Returns {1, delay µs} when reserved, {0, delay µs} when the deadline comes first, and
-- {2, delay µs} when the start is beyond the horizon: ask again closer to it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local deadline = tonumber(ARGV[3])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local slot = now
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > slot then slot = paused end
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then
  local nth = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  local free = tonumber(nth[2]) + window
  if free > slot then slot = free end
end
if n > 0 then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local l = tonumber(last[2])
  if l > slot then slot = l end
end
local delay = slot - now
if deadline >= 0 and delay > deadline then
  return {0, delay}
end
if delay > tonumber(ARGV[7]) then
  return {2, delay}
end
redis.call('ZADD', KEYS[1], slot, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.floor((delay + window) / 1000) + 1000)
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
return {1, delay}
