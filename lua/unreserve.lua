-- Gives back a start reserved but not used (the command went back to the queue before its
-- turn), so the account's budget is not held by a call that never comes.
--
-- KEYS[1]  the account's log       ARGV[1] the start's member
return redis.call('ZREM', KEYS[1], ARGV[1])
