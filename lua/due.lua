-- due: members of a deadline ZSET whose deadline has passed on the Redis clock (read only).
-- KEYS[1] ZSET member -> deadline ms   ARGV[1] maximum number of members to return
-- Returns a list of members.
--#include clock
local now = now_ms()
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
