-- Fleet membership: a replica says it is alive (and which partitions it consumes), leaves, or
-- just looks. Timed by Redis's clock, so replicas' clocks need not agree.
--
-- KEYS[1]  members: sorted set, member -> when it expires (ms)
-- KEYS[2]  owned: hash, member -> the partitions it consumes ("0,3,7")
-- KEYS[3]  the member's name (`fleet.name`): string, the member (`name/instance`) that has it,
--          expiring as membership does. One live process per name: a member whose name another
--          live member has is not counted in, and keeps no hold.
-- ARGV[1]  the member     ARGV[2] how long a heartbeat lasts (ms)
-- ARGV[3]  'beat' | 'leave' | 'look'      ARGV[4] the member's partitions (for 'beat')
-- KEYS[4..] the holds the member keeps (lua/hold.lua), for 'beat': each held by it lasts
--          another ttl (one found gone is set again); one another member holds is reported
--          lost.
-- Returns {now (ms), named, lost, member, expires (ms), partitions, member, expires, ...}:
-- named is '' when the member has its name (or for 'leave' and 'look'), else the member that
-- has it; lost lists the positions (1 for KEYS[4]) of the holds lost, comma-separated; the
-- members are the live ones, sorted by name.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, member in ipairs(gone) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
end
local named = ''
local lost = {}
if ARGV[3] == 'beat' then
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[1] then
    named = holder
  else
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ttl)
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
    for i = 4, #KEYS do
      local held = redis.call('GET', KEYS[i])
      if held == ARGV[1] then
        redis.call('PEXPIRE', KEYS[i], ttl)
      elseif not held then
        -- Gone without another taking it: Redis lost its data (a restart without
        -- persistence). The member still consumes there, having kept it in time, so it takes
        -- it again.
        redis.call('SET', KEYS[i], ARGV[1], 'PX', ttl)
      else
        table.insert(lost, tostring(i - 3))
      end
    end
  end
elseif ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  if redis.call('GET', KEYS[3]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
  end
end
-- A fleet that stopped leaves nothing behind for long.
if redis.call('ZCARD', KEYS[1]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl * 10)
  redis.call('PEXPIRE', KEYS[2], ttl * 10)
end
local out = {tostring(now), named, table.concat(lost, ',')}
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local names = {}
local expires = {}
for i = 1, #live, 2 do
  table.insert(names, live[i])
  expires[live[i]] = live[i + 1]
end
table.sort(names)
for _, member in ipairs(names) do
  table.insert(out, member)
  table.insert(out, expires[member])
  table.insert(out, redis.call('HGET', KEYS[2], member) or '')
end
return out
