-- ready: a player answers the ready check (`loading_complete`, PROTOCOL 4; seeds plan 3).
-- KEYS[1] match  KEYS[2] loading ZSET  KEYS[3] player hash
-- ARGV[1] player  ARGV[2] match id  ARGV[3] connection id  ARGV[4] allocation timeout ms
-- ARGV[5] this worker's id (it runs the handoff)
-- Returns {"unknown"} (no such match) | {"replaced"} | {"wrong_session"} (not a member)
--       | {"final", status} (the match already ended; that outcome's message is on its way)
--       | {"ready", ready count, size}
--       | {"allocating", deadline_ms, teams JSON, created_ms, player1, ticket1, ...} for the last:
--         the caller publishes the battle_request.
-- The status is checked before anything else, so a ready racing a cancel or a timeout can never
-- revive a finished match.
local m = KEYS[1]
if redis.call('EXISTS', m) == 0 then
  return {'unknown'}
end
if redis.call('HGET', KEYS[3], 'conn') ~= ARGV[3] then
  return {'replaced'}
end
local status = redis.call('HGET', m, 'status')
if redis.call('HEXISTS', m, 't:' .. ARGV[1]) == 0 then
  return {'wrong_session'}
end
if status ~= 'loading' then
  return {'final', status}
end
if redis.call('HSETNX', m, 'r:' .. ARGV[1], 1) == 1 then
  redis.call('HINCRBY', m, 'ready', 1)
end
local info = redis.call('HMGET', m, 'ready', 'size', 'teams', 'players', 'created')
if tonumber(info[1]) < tonumber(info[2]) then
  return {'ready', info[1], info[2]}
end
--#include clock
local deadline = now_ms() + tonumber(ARGV[4])
redis.call('HSET', m, 'status', 'allocating', 'deadline', deadline, 'allocator', ARGV[5],
           'all_ready', deadline - tonumber(ARGV[4]))
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
local out = {'allocating', tostring(deadline), info[3], info[5]}
for p in string.gmatch(info[4], '[^,]+') do
  out[#out + 1] = p
  out[#out + 1] = redis.call('HGET', m, 't:' .. p) or ''
end
return out
