-- heartbeat: a worker says it is alive until now + ttl (Redis clock).
-- KEYS[1] workers ZSET   ARGV[1] worker id   ARGV[2] ttl ms
-- Returns the new deadline in ms.
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return deadline
