-- heartbeat: a worker says it is alive until now + ttl (Redis clock).
-- KEYS[1] workers ZSET   ARGV[1] worker id   ARGV[2] ttl ms
-- Returns the new deadline in ms.
--#include clock
local deadline = now_ms() + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return deadline
