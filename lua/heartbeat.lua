-- heartbeat: a worker says it is alive until now + ttl (Redis clock).
-- KEYS[1] workers ZSET   ARGV[1] worker id   ARGV[2] ttl ms
-- Returns {new deadline ms, the previous deadline ms ("" when the worker was not registered),
-- now ms}. A previous deadline already past, or none, tells a worker that had registered that
-- it went silent long enough for the others to reap it (server/app/housekeeping.py).
--#include clock
local now = now_ms()
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
local deadline = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return {tostring(deadline), previous or '', tostring(now)}
