-- Fleet membership: a replica says it is alive (and which partitions it consumes), leaves, or
-- just looks. Timed by Redis's clock, so replicas' clocks need not agree.
--
-- KEYS[1]  members: sorted set, member -> when it expires (ms)
-- KEYS[2]  owned: hash, member -> the partitions it consumes ("0,3,7")
-- KEYS[3]  the member's name (`fleet.name`): string, the member (`name/instance`) that has it,
--          expiring as membership does. One live process per name: a member whose name another
--          live member has is not counted in, and keeps no hold.
-- KEYS[4]  the fleet's epoch: hash, since (ms, when it was made) and lost ('1' when it was
--          made because Redis lost the fleet's state: flushed, or restarted without its data).
--          Made by the first 'beat' that finds none; it lasts as long as the membership.
-- KEYS[5]  traits: hash, member -> what it does that earlier versions did not ('intake': it
--          admits each account's commands at the intake, docs/fairness.md). Earlier versions
--          write nothing here, so a member without traits is one of them.
-- ARGV[1]  the member     ARGV[2] how long a heartbeat lasts (ms)
-- ARGV[3]  'beat' | 'leave' | 'look'      ARGV[4] the member's partitions (for 'beat')
-- ARGV[5]  the epoch the member knows (its since), '' when it knows none (it just started):
--          a member that knew one and finds none, or finds one made without it by a member that
--          knew none, within the ttl, has seen Redis lose the fleet's state.
-- ARGV[6]  for each hold kept, '1' when the member kept it in time (this heartbeat was sent
--          before the hold's deadline), else '0'.
-- ARGV[7]  the member's traits (for 'beat').
-- KEYS[6..] the holds the member keeps (lua/hold.lua), for 'beat': each held by it lasts
--          another ttl; one another member holds is reported lost; and one found gone is set
--          again if Redis lost the fleet's state since this member's last heartbeat (the epoch
--          it knows is not the one found) and the member kept it in time, else reported lost
--          (it expired: the member was silent too long, a pause, say).
-- Returns {now (ms), named, epoch, settling (ms), lost, member, expires (ms), partitions,
-- traits, ...}:
-- named is '' when the member has its name (or for 'leave' and 'look'), else the member that
-- has it; epoch is the epoch's since ('' when there is none); settling is how long the fleet
-- is still settling after a loss of its state (0: it is not), while no hold is taken anew
-- (lua/hold.lua) and holders take theirs back; lost lists the positions (1 for KEYS[6]) of the
-- holds lost, comma-separated; the members are the live ones, sorted by name.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, member in ipairs(gone) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
  redis.call('HDEL', KEYS[5], member)
end
local named = ''
local lost = {}
if ARGV[3] == 'beat' then
  local since = redis.call('HGET', KEYS[4], 'since')
  local state_lost = ARGV[5] ~= '' and ARGV[5] ~= since
  if not since then
    -- No epoch: the fleet starts (nobody knew one), or Redis lost its state (this member knew
    -- one). Then the others' holds are gone too, until each takes its own back.
    since = tostring(now)
    local lost_state = '0'
    if ARGV[5] ~= '' then lost_state = '1' end
    redis.call('HSET', KEYS[4], 'since', since, 'lost', lost_state)
  elseif ARGV[5] ~= '' and ARGV[5] ~= since and now < tonumber(since) + ttl then
    -- Made, within the ttl, by a member that knew none, after the one this member knew:
    -- Redis lost the state, and a replica that just started heartbeated first.
    redis.call('HSET', KEYS[4], 'lost', '1')
  end
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[1] then
    named = holder
  else
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ttl)
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
    redis.call('HSET', KEYS[5], ARGV[1], ARGV[7])
    for i = 6, #KEYS do
      local held = redis.call('GET', KEYS[i])
      if held == ARGV[1] then
        redis.call('PEXPIRE', KEYS[i], ttl)
      elseif not held and state_lost and string.sub(ARGV[6], i - 5, i - 5) == '1' then
        -- Gone because Redis lost its data (a restart without persistence, a flush), not by
        -- expiry: the member still consumes there, having kept it in time, so it takes it
        -- again.
        redis.call('SET', KEYS[i], ARGV[1], 'PX', ttl)
      else
        table.insert(lost, tostring(i - 5))
      end
    end
  end
elseif ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  if redis.call('GET', KEYS[3]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
  end
end
-- A fleet that stopped leaves nothing behind for long.
if redis.call('ZCARD', KEYS[1]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl * 10)
  redis.call('PEXPIRE', KEYS[2], ttl * 10)
  redis.call('PEXPIRE', KEYS[4], ttl * 10)
  redis.call('PEXPIRE', KEYS[5], ttl * 10)
end
local epoch = redis.call('HMGET', KEYS[4], 'since', 'lost')
local settling = 0
if epoch[1] and epoch[2] == '1' then
  settling = math.max(0, tonumber(epoch[1]) + ttl - now)
end
local out = {tostring(now), named, epoch[1] or '', tostring(settling), table.concat(lost, ',')}
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
  table.insert(out, redis.call('HGET', KEYS[5], member) or '')
end
return out
