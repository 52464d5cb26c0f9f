-- One holder per queue (docs/contract.md §9, "One holder at a time"): a replica takes a
-- queue's hold before it registers a consumer there, and gives it once that consumer's channel
-- is closed. Its heartbeat keeps the hold (lua/heartbeat.lua); a holder silent for the member
-- time-to-live loses it, and by then it has stopped consuming by itself.
--
-- KEYS[1]  the hold: string, the holder's id, expiring
-- KEYS[2]  the fleet's epoch (lua/heartbeat.lua)
-- ARGV[1]  the replica     ARGV[2] 'take' | 'give'     ARGV[3] how long a hold lasts (ms)
-- take: '' when this replica holds the queue now (taken, or kept), else the holder's id, or
--       '-' when nobody holds it but no hold may be taken anew yet: the fleet has no epoch (Redis
--       lost its state and nobody has heartbeated since), or it is settling after a loss of its
--       state, while the holders the loss left out take theirs back in their heartbeats.
-- give: '' when given (or nobody held it), else the holder's id (left alone).
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == 'take' then
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
    return ''
  end
  if holder then
    return holder
  end
  local epoch = redis.call('HMGET', KEYS[2], 'since', 'lost')
  if not epoch[1] then
    return '-'
  end
  if epoch[2] == '1' then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if now < tonumber(epoch[1]) + tonumber(ARGV[3]) then
      return '-'
    end
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[3]))
  return ''
end
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return ''
end
return holder or ''
