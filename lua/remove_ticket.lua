-- remove_ticket: take a poison candidate (undecodable ticket) out of a mode's queue.
-- KEYS[1] player hash  KEYS[2] queue  KEYS[3] tickets  KEYS[4] grace  KEYS[5] changes
-- ARGV[1] player  ARGV[2] mode
-- ARGV[3] delivery channel prefix (keys.DELIVERY_PREFIX)
-- Returns {"removed"}, or {"absent"}. A connected owner's worker hears a "removed" notice
-- (dequeued{removed}), from here so it stays in order with the other notices.
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  return {'absent'}
end
--#include notify
--#include changes
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
changed(KEYS[5], 'r', ARGV[1])
local cur = redis.call('HMGET', KEYS[1], 'state', 'mode', 'worker', 'conn')
if cur[1] == 'queued' and cur[2] == ARGV[2] then
  if cur[4] then
    redis.call('HSET', KEYS[1], 'state', 'idle')
    redis.call('HDEL', KEYS[1], 'mode', 'queued_at')
    local by_worker = {}
    recipient(by_worker, cur[3], cur[4], '[' .. cjson.encode(ARGV[1]) .. ',' .. cjson.encode(cur[4]) .. ']')
    post('{"e":"removed","mode":' .. cjson.encode(ARGV[2]), by_worker)
    flush(ARGV[3])
  else
    redis.call('DEL', KEYS[1])
  end
end
return {'removed'}
