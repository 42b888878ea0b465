-- remove_ticket: take a poison candidate (undecodable ticket) out of a mode's queue.
-- KEYS[1] player hash  KEYS[2] queue  KEYS[3] tickets  KEYS[4] grace   ARGV[1] player  ARGV[2] mode
-- ARGV[3] delivery channel prefix (keys.DELIVERY_PREFIX)
-- Returns {"removed", worker, conn}, or {"absent"}. A connected owner is sent
-- `dequeued{removed}` on its worker's channel, from here so it stays in order.
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  return {'absent'}
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local cur = redis.call('HMGET', KEYS[1], 'state', 'mode', 'worker', 'conn')
if cur[1] == 'queued' and cur[2] == ARGV[2] then
  if cur[4] then
    redis.call('HSET', KEYS[1], 'state', 'idle')
    redis.call('HDEL', KEYS[1], 'mode', 'queued_at')
    if cur[3] then
      redis.call('PUBLISH', ARGV[3] .. cur[3], '{"kind":"deliver","items":[{"player":'
        .. cjson.encode(ARGV[1]) .. ',"conn":' .. cjson.encode(cur[4])
        .. ',"message":{"type":"dequeued","game_mode":' .. cjson.encode(ARGV[2])
        .. ',"reason":"removed"}}]}')
    end
  else
    redis.call('DEL', KEYS[1])
  end
  return {'removed', cur[3] or '', cur[4] or ''}
end
return {'removed', '', ''}
