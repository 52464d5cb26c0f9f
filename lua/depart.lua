-- The vendor's limit at the vendor's clock, fleet-wide (docs/contract.md §4): a call leaves
-- only while fewer than `limit` calls of its account are on the wire or were answered within
-- the last window. `agentassist::arrivals` says why that is enough. Timed by Redis's clock.
--
-- KEYS[1]  the account's arrivals: a sorted set of calls, each scored with when the API saw it
--          at the latest (µs since the epoch): its departure plus the bound of a call that
--          gets no answer, lowered to the time of its answer when one comes (`arrived.lua`)
-- KEYS[2]  the account's pause (µs since the epoch, set after a 429: `pause.lua`)
-- ARGV[1]  limit   ARGV[2] window (µs)   ARGV[3] the bound (µs)   ARGV[4] the call's member
-- Returns {1, 0} when the call may leave (it is recorded); else {0, µs until the pause ends or
-- enough recorded answers have left the window}, or {2, µs} when a call still on the wire
-- stands in the way: its answer will free the gate sooner than the bound says, so ask again
-- soon. A member already recorded (let through before, its answer lost on the way back) is let
-- through again with a fresh bound, not counted twice.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])

-- Records the call as leaving now, and keeps the set as long as its latest entry can matter.
local function leave()
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[1], math.floor((tonumber(last[2]) - now + window) / 1000) + 1000)
  return {1, 0}
end

local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then
  return {0, paused - now}
end
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  return leave()
end

-- An answer a window or more ago can no longer share a window with a call leaving now.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n < limit then
  return leave()
end
-- `n - limit + 1` of them must leave the window; they leave in the order of their scores.
local nth = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
local seen_by = tonumber(nth[2])
if seen_by > now then
  return {2, seen_by + window - now}
end
return {0, seen_by + window - now}
