-- Reserves the earliest call start an account's budget allows (`reserve_fn.lua`, which
-- precedes this file in the script).
--
-- KEYS[1]  the account's log   KEYS[2] the account's pause
-- KEYS[3]  the command's "a call may be on the wire" mark
-- ARGV     as `reserve`'s a[1..7]
-- Returns `reserve`'s answer.
return reserve(KEYS[1], KEYS[2], KEYS[3], ARGV)
