-- A call's answer came back: the API saw it by now (Redis's clock), and its score in the
-- account's arrivals comes down to that; it never goes up. A call already gone from the set
-- (it left the window) stays gone.
--
-- KEYS[1]  the account's arrivals (`depart.lua`)   ARGV[1] the call's member
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > now then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  return 1
end
return 0
