-- expire_grace: remove a disconnected player whose resume grace has passed (PROTOCOL 4).
-- KEYS[1] player hash  KEYS[2] queue  KEYS[3] tickets  KEYS[4] grace  KEYS[5] changes
-- ARGV[1] player id  ARGV[2] mode
-- Returns {"removed"} | {"kept"} (grace not over, or the player came back).
-- Safe to run from any number of workers at once: the deadline is re-checked on the Redis clock.
local deadline = redis.call('ZSCORE', KEYS[4], ARGV[1])
if not deadline then
  return {'kept'}
end
--#include clock
local now = now_ms()
if tonumber(deadline) > now then
  return {'kept'}
end
--#include changes
redis.call('ZREM', KEYS[4], ARGV[1])
local cur = redis.call('HMGET', KEYS[1], 'conn', 'state', 'mode')
if cur[1] then
  changed(KEYS[5], 'u', ARGV[1])  -- it is back (attach normally ends the grace itself)
  return {'kept'}
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
changed(KEYS[5], 'r', ARGV[1])
if cur[3] == ARGV[2] or not cur[3] then
  redis.call('DEL', KEYS[1])
end
return {'removed'}
