-- One holder per queue (docs/contract.md §9, "One holder at a time"): a replica takes a
-- queue's hold before it registers a consumer there, and gives it once that consumer's channel
-- is closed. Its heartbeat keeps the hold (lua/heartbeat.lua); a holder silent for the member
-- time-to-live loses it, and by then it has stopped consuming by itself.
--
-- KEYS[1]  the hold: string, the holder's id, expiring
-- ARGV[1]  the replica     ARGV[2] 'take' | 'give'     ARGV[3] how long a hold lasts (ms)
-- take: '' when this replica holds the queue now (taken, or kept), else the holder's id.
-- give: '' when given (or nobody held it), else the holder's id (left alone).
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == 'take' then
  if not holder or holder == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[3]))
    return ''
  end
  return holder
end
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return ''
end
return holder or ''
