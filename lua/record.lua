-- Records a command's terminal event for the fleet, and lets its claim go.
--
-- KEYS[1]  the command's outcome   KEYS[2] its claim   KEYS[3] its "call on the wire" mark
-- ARGV[1]  the outcome             ARGV[2] how long it is kept (ms)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
