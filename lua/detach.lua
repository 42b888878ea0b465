-- detach: a connection is gone (closed, or its worker died).
-- KEYS[1] player hash   KEYS[2] the detaching worker's player set   KEYS[3] workers ZSET
-- KEYS[4..8] queue, tickets, grace, changes, left of the expected mode (absent when none)
-- ARGV[1] player id  ARGV[2] worker id  ARGV[3] connection id, or "" for any connection of this
--         worker (used when reaping a dead worker)  ARGV[4] expected mode  ARGV[5] resume grace ms
-- ARGV[6] "cancel", or "abort" when the worker is shutting down (nobody is at fault)
-- ARGV[7] ms after which the mode's leader cancels the match if the caller has not
-- A record released into grace or out of a ready check keeps the released connection's id
-- (`released`, lua/include/owner.lua): a live connection of the same worker whose attach a
-- failover lost may take it back.
-- A player leaving a ready check is recorded in the mode's `left` ZSET in this same script, so
-- the cancel that must follow has an owner even if the caller dies right after.
-- ARGV[8] "1": a reaper releasing a silent worker's players; refused ({"alive"}) once that
-- worker's heartbeat deadline is in the future again: it was only stalled (a pause, a long
-- GC), and its players stay its own.
-- Returns {"retry", mode} on a mode mismatch, {"stale"} when another connection owns the player
-- (nothing changes), else {"removed"} (idle: record deleted), {"kept"} (a state this script does
-- not know: only the connection released), {"grace", deadline_ms} (queued:
-- ticket kept but not matchable until it resumes or the deadline passes), {"loading", match id, mode}
-- (the caller cancels that match: PROTOCOL 4, disconnect while loading).
--#include clock
--#include changes
--#include alive
local p = KEYS[1]
if ARGV[8] == '1' and worker_alive(KEYS[3], ARGV[2]) then
  return {'alive'}
end
local cur = redis.call('HMGET', p, 'worker', 'conn', 'state', 'mode', 'match', 'found')
local owner_worker, owner_conn = cur[1] or '', cur[2] or ''
local mine = owner_worker == ARGV[2] and (ARGV[3] == '' or owner_conn == ARGV[3])
if not mine then
  if owner_worker ~= ARGV[2] then
    redis.call('SREM', KEYS[2], ARGV[1])
  end
  return {'stale'}
end
local mode = cur[4] or ''
if mode ~= ARGV[4] then
  return {'retry', mode}
end
redis.call('SREM', KEYS[2], ARGV[1])
local state = cur[3] or 'idle'
local function release()
  if owner_conn ~= '' then
    redis.call('HSET', p, 'released', owner_conn)
  end
  redis.call('HDEL', p, 'worker', 'conn')
end
if state == 'queued' then
  local deadline = now_ms() + tonumber(ARGV[5])
  release()
  if redis.call('ZADD', KEYS[6], deadline, ARGV[1]) == 1 then
    changed(KEYS[7], 'g', ARGV[1])  -- not matchable while its grace runs
  end
  return {'grace', tostring(deadline)}
elseif state == 'loading' then
  release()
  redis.call('ZADD', KEYS[8], now_ms() + tonumber(ARGV[7]), (cur[5] or '') .. '|' .. ARGV[1] .. '|' .. ARGV[6])
  return {'loading', cur[5] or '', mode}
end
if state ~= 'idle' then
  -- A state this script does not know (a newer server's, during a rolling deploy): the
  -- connection is released and the record kept for the server that understands it. Deleted,
  -- whatever it points to (a ticket, a match) would be left without its player.
  release()
  return {'kept'}
end
if cur[6] then
  -- Matched while away and not told yet (lua/finish_match.lua, lua/attach.lua): kept for
  -- another resume grace, so that the next connection hears its match_found.
  release()
  redis.call('PEXPIRE', p, math.max(tonumber(ARGV[5]), 1))
  return {'removed'}
end
redis.call('DEL', p)
return {'removed'}
