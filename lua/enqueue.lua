-- enqueue: put a connected, idle player into one mode's queue (DESIGN invariant 1).
-- KEYS[1] player hash  KEYS[2] queue  KEYS[3] tickets  KEYS[4] grace  KEYS[5] changes (all of the
-- requested mode)  KEYS[6] the player's penalty ZSET (ready checks it dodged: match id -> time ms)
-- ARGV[1] player id  ARGV[2] connection id  ARGV[3] mode  ARGV[4] rating  ARGV[5] attrs (JSON)
-- ARGV[6] penalty window ms  ARGV[7] penalty threshold  ARGV[8] block ms
-- Returns {"ok", queued_at_ms} | {"replaced"} (this connection no longer owns the player)
--       | {"gone"} (no record: Redis lost it, or a sweep released it; or a failover lost this
--         connection's attach and an ended one of its worker released the record,
--         lua/include/owner.lua: the caller re-attaches)
--       | {"already", state, mode, queued_at, match} (already queued or loading, in any mode;
--         match: the loading session, "" when queued)
--       | {"blocked", retry_after_ms} (too many dodged ready checks within the window).
-- queued_at comes from the Redis clock so every worker and host agrees on wait times.
--#include owner
local p = KEYS[1]
local cur = redis.call('HMGET', p, 'conn', 'state', 'mode', 'queued_at', 'released', 'match', 'found')
if not cur[1] and (not cur[2] or released_here(cur[5], ARGV[2])) then
  return {'gone'}
elseif cur[1] ~= ARGV[2] then
  return {'replaced'}
end
local state = cur[2] or 'idle'
if state ~= 'idle' then
  return {'already', state, cur[3] or '', cur[4] or '', state == 'loading' and cur[6] or ''}
end
--#include clock
--#include changes
local now = now_ms()
-- Most players have no dodges on record: one EXISTS instead of trimming and counting.
if redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - tonumber(ARGV[6]))
  if redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[7]) then
    local newest = redis.call('ZREVRANGE', KEYS[6], 0, 0, 'WITHSCORES')
    local blocked_until = tonumber(newest[2]) + tonumber(ARGV[8])
    if blocked_until > now then
      return {'blocked', tostring(blocked_until - now)}
    end
  end
end
local ticket = ARGV[4] .. '|' .. now .. '|' .. ARGV[5]  -- server/matching/tickets.py
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ticket)
redis.call('ZREM', KEYS[4], ARGV[1])
changed(KEYS[5], 'a', ARGV[1], ticket)
redis.call('HSET', p, 'state', 'queued', 'mode', ARGV[3], 'queued_at', now)
if cur[7] then
  -- A match found while away and not forgotten (its connection's found_told failed): the
  -- player has moved on, and no later connection must hear it (lua/finish_match.lua).
  redis.call('HDEL', p, 'found', 'found_mode')
end
return {'ok', tostring(now)}
