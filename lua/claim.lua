-- Before a replica calls the API for a command: the command's recorded outcome if it was
-- completed anywhere in the fleet; else the claim, unless another live replica holds it; and,
-- when asked, with the claim the command's first start from its account's budget, so the
-- common case costs one round trip, not two (`reserve_fn.lua` precedes this file).
--
-- KEYS[1]  the command's outcome   KEYS[2] its claim   KEYS[3] its "call on the wire" mark
-- KEYS[4]  the account's log       KEYS[5] the account's pause (both only with a start asked)
-- ARGV[1]  the claimant            ARGV[2] the lease (ms)
-- ARGV[3]  '1': the command was replayed from the dead-letter queue, and only a completed
--          outcome ('transfer.succeeded') answers it; any other is passed over (and replaced
--          when the new outcome is recorded)
-- ARGV[4..10]  a start asked for: `reserve`'s a[1..7]; absent: none
-- Returns {'done', outcome, -1, 0} | {'held', ms left, -1, 0} | {'mine', '', r, delay} |
-- {'taken_over', '', r, delay}: mine, but an earlier claimant that is gone may have had a call
-- on the wire. r and delay are `reserve`'s answer, r = -1 when no start was asked.
local done = redis.call('GET', KEYS[1])
if done then
  local answers = true
  if ARGV[3] == '1' then
    -- A record that does not decode is returned as it is: the caller reports it.
    local ok, record = pcall(cjson.decode, done)
    answers = not ok or type(record) ~= 'table' or record.k == 'transfer.succeeded'
  end
  if answers then
    return {'done', done, -1, 0}
  end
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return {'held', tostring(redis.call('PTTL', KEYS[2])), -1, 0}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local mark = redis.call('GET', KEYS[3])
local state = 'mine'
if not holder and mark and mark ~= ARGV[1] then
  state = 'taken_over'
end
if #ARGV < 10 then
  return {state, '', -1, 0}
end
local start = reserve(KEYS[4], KEYS[5], KEYS[3], {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]})
return {state, '', start[1], start[2]}
