-- Extends a claim, if the claimant still holds it.
--
-- KEYS[1]  the command's claim     ARGV[1] the claimant   ARGV[2] the lease (ms)
-- Returns 1 if renewed, 0 if the claim is someone else's or gone.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
