-- Gives a claim up, if the claimant still holds it: a command returned to the queue at
-- shutdown need not wait for the lease to run out on the replica that takes it next.
--
-- KEYS[1]  the command's claim     ARGV[1] the claimant
-- Returns 1 if released, 0 if the claim was someone else's or gone.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
