-- Before a replica calls the API for a command: the command's recorded outcome if it was
-- completed anywhere in the fleet; else the claim, unless another live replica holds it.
--
-- KEYS[1]  the command's outcome   KEYS[2] its claim   KEYS[3] its "call on the wire" mark
-- ARGV[1]  the claimant            ARGV[2] the lease (ms)
-- ARGV[3]  '1': the command was replayed from the dead-letter queue, and only a completed
--          outcome ('transfer.succeeded') answers it; any other is passed over (and replaced
--          when the new outcome is recorded)
-- Returns {'done', outcome} | {'held', ms left} | {'mine', ''} | {'taken_over', ''}: mine,
-- but an earlier claimant that is gone may have had a call on the wire.
local done = redis.call('GET', KEYS[1])
if done then
  local answers = true
  if ARGV[3] == '1' then
    -- A record that does not decode is returned as it is: the caller reports it.
    local ok, record = pcall(cjson.decode, done)
    answers = not ok or type(record) ~= 'table' or record.k == 'transfer.succeeded'
  end
  if answers then
    return {'done', done}
  end
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return {'held', tostring(redis.call('PTTL', KEYS[2]))}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local mark = redis.call('GET', KEYS[3])
if not holder and mark and mark ~= ARGV[1] then
  return {'taken_over', ''}
end
return {'mine', ''}
