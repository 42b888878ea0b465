-- ready: a player answers the ready check (`loading_complete`, PROTOCOL 4; seeds plan 3).
-- KEYS[1] match  KEYS[2] loading ZSET  KEYS[3] player hash
-- ARGV[1] player  ARGV[2] match id  ARGV[3] connection id  ARGV[4] allocation timeout ms
-- ARGV[5] this worker's id (it runs the handoff)
-- Returns {"unknown"} (no such match) | {"replaced"} | {"gone"} (no player record, or one
--         released by an ended connection of this worker, lua/include/owner.lua: the caller
--         re-attaches) | {"wrong_session"} (not a member)
--       | {"final", status} (the match already ended; that outcome's message is on its way)
--       | {"ready", ready count, size}
--       | {"allocating", deadline_ms, teams JSON, created_ms, player1, ticket1, ...} for the last:
--         the caller publishes the battle_request (also for a member's repeated ready on the
--         worker running the handoff, before its deadline: that allocator ignores a match it
--         handed off already).
-- The status is checked before anything else, so a ready racing a cancel or a timeout can never
-- revive a finished match.
local m = KEYS[1]
local p = ARGV[1]
local info = redis.call('HMGET', m, 'status', 't:' .. p, 'r:' .. p, 'size')
local status = info[1]
if not status then
  return {'unknown'}
end
--#include owner
local rec = redis.call('HMGET', KEYS[3], 'conn', 'state', 'released')
local conn = rec[1]
if not conn and (not rec[2] or released_here(rec[3], ARGV[3])) then
  return {'gone'}
elseif conn ~= ARGV[3] then
  return {'replaced'}
end
if not info[2] then
  return {'wrong_session'}
end
local function allocating(deadline)
  local rest = redis.call('HMGET', m, 'teams', 'players', 'created')
  local out = {'allocating', tostring(deadline), rest[1], rest[3]}
  local players, fields = {}, {}
  for q in string.gmatch(rest[2], '[^,]+') do
    players[#players + 1] = q
    fields[#fields + 1] = 't:' .. q
  end
  local tickets = redis.call('HMGET', m, unpack(fields))
  for j = 1, #players do
    out[#out + 1] = players[j]
    out[#out + 1] = tickets[j] or ''
  end
  return out
end
--#include clock
if status ~= 'loading' then
  if status == 'allocating' and info[3] then
    local handoff = redis.call('HMGET', m, 'allocator', 'deadline')
    if handoff[1] == ARGV[5] and tonumber(handoff[2]) > now_ms() then
      -- A member's ready said again on the worker that runs the handoff, before its deadline:
      -- the reply to the ready that completed the match may have been lost (a timeout after
      -- the script ran), so no handoff would start. Answered as that one was; the allocator
      -- ignores a match it handed off already (until this deadline).
      return allocating(handoff[2])
    end
  end
  return {'final', status}
end
local ready
if info[3] then
  ready = tonumber(redis.call('HGET', m, 'ready'))  -- said twice: harmless
else
  redis.call('HSET', m, 'r:' .. p, 1)
  ready = redis.call('HINCRBY', m, 'ready', 1)
end
if ready < tonumber(info[4]) then
  return {'ready', tostring(ready), info[4]}
end
local deadline = now_ms() + tonumber(ARGV[4])
redis.call('HSET', m, 'status', 'allocating', 'deadline', deadline, 'allocator', ARGV[5],
           'all_ready', deadline - tonumber(ARGV[4]))
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
return allocating(deadline)
