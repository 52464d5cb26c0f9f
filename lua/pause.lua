-- Holds every later start of an account until `for` from now (Redis's clock): a 429's
-- Retry-After applies to the whole fleet. A later pause wins; an earlier one changes nothing.
--
-- KEYS[1]  the account's pause (µs since the epoch)
-- ARGV[1]  the pause, µs from now
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untill = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if untill > current then
  redis.call('SET', KEYS[1], untill, 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
