-- dequeue: a player asks to leave its queue.
-- KEYS[1] player hash  KEYS[2..5] queue, tickets, grace, changes of the expected mode (absent
-- when none)
-- ARGV[1] player id  ARGV[2] connection id  ARGV[3] expected mode ("" = none)
-- Returns {"ok", mode} | {"replaced"} | {"gone"} (no record, or one released by an ended
--         connection of this worker, lua/include/owner.lua: the caller re-attaches)
--       | {"retry", mode} | {"not_in_queue"} | {"invalid_state", state}
--#include owner
local p = KEYS[1]
local cur = redis.call('HMGET', p, 'conn', 'state', 'mode', 'released')
if not cur[1] and (not cur[2] or released_here(cur[4], ARGV[2])) then
  return {'gone'}
elseif cur[1] ~= ARGV[2] then
  return {'replaced'}
end
local mode = cur[3] or ''
if mode ~= ARGV[3] then
  return {'retry', mode}
end
local state = cur[2] or 'idle'
if state == 'idle' then
  return {'not_in_queue'}
elseif state ~= 'queued' then
  return {'invalid_state', state}
end
--#include changes
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
changed(KEYS[5], 'r', ARGV[1])
redis.call('HSET', p, 'state', 'idle')
redis.call('HDEL', p, 'mode', 'queued_at')
return {'ok', mode}
