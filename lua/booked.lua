-- An account's budget as the fleet has booked it, seen now (Redis's clock): for an intake that
-- takes over, or starts admitting again, to admit from where the fleet stands rather than from
-- an empty budget. Reads only.
--
-- KEYS[1]  the account's log (`reserve_fn.lua`)   KEYS[2] the account's pause (`pause.lua`)
-- ARGV[1]  the window (µs)
-- Returns {µs until the pause ends (0: none), then each start booked within the last window or
-- later, µs from now (negative: past), ascending}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {0}
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then out[1] = paused - now end
local starts = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]) + 1, '+inf', 'WITHSCORES')
for i = 2, #starts, 2 do
  out[#out + 1] = tonumber(starts[i]) - now
end
return out
