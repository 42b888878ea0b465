-- attach: a connection claims a player (PROTOCOL 1 "One connection per player").
-- KEYS[1] player hash   KEYS[2] this worker's player set   KEYS[3..6] queue, tickets, grace,
--         changes of the mode the caller believes the player is in (absent when it believes none)
-- ARGV[1] player id  ARGV[2] worker id  ARGV[3] connection id  ARGV[4] expected mode ("" = none)
-- ARGV[5] "1": a re-attach after Redis lost the record (or the write of this connection's
--         attach), only while there is no record at all, it is this connection's own, or it
--         names ARGV[6], a connection of this same worker the caller knows is gone, or no
--         connection holds it and one of this worker released it (lua/include/owner.lua):
--         else {"replaced"}, whoever wrote it since.
-- Returns {"retry", mode} when the player's mode is not the expected one (caller re-reads and
-- retries with the right keys), else
-- {"ok", state, mode, queued_at, previous worker, previous conn, match, found mode, found match};
-- "" for absent values (a re-attach over a released record names the released connection as
-- the previous one; `found`: the match the player was assigned to while no connection held it).
-- A queued player in resume grace is taken out of grace: it is matchable again. `released` is
-- cleared: only a release since this attach may be taken back (lua/include/owner.lua).
--#include owner
local p = KEYS[1]
local cur = redis.call('HMGET', p, 'mode', 'state', 'queued_at', 'worker', 'conn', 'match', 'released',
  'found', 'found_mode')
local reattach = ARGV[5] == '1'
if reattach and cur[2] and cur[5] ~= ARGV[3]
    and not (cur[5] and cur[5] == ARGV[6] and cur[4] == ARGV[2])
    and not (not cur[5] and released_here(cur[7], ARGV[3])) then
  return {'replaced'}
end
local previous = cur[5] or (reattach and cur[7]) or ''
local mode = cur[1] or ''
if mode ~= ARGV[4] then
  return {'retry', mode}
end
local state = cur[2] or 'idle'
redis.call('HSET', p, 'state', state, 'worker', ARGV[2], 'conn', ARGV[3])
-- A detach that writes no `released` (an older detach.lua, in a rolling deploy) must not leave
-- an earlier release's id to let a connection this one replaced take the record back. (Read
-- above: the common attach, over no release, pays no command for it.)
if cur[7] then redis.call('HDEL', p, 'released') end
-- Matched while no connection held it (lua/finish_match.lua): the record was kept for the
-- resume grace so that a connection hears of the match. It is this connection's now, so it
-- no longer expires; `found` stays until the match_found is sent (lua/found_told.lua): a
-- connection that ends before its welcome leaves it for the next (lua/detach.lua). A record
-- released with an expiry whose `found` was told meanwhile (its detach and found_told
-- crossed) must not expire under this connection either: every released record is made
-- lasting (the common attach, over no record, pays nothing).
if cur[8] or cur[7] then
  redis.call('PERSIST', p)
end
redis.call('SADD', KEYS[2], ARGV[1])
--#include changes
if mode ~= '' and state == 'queued' and redis.call('ZREM', KEYS[5], ARGV[1]) == 1 then
  changed(KEYS[6], 'u', ARGV[1])  -- resumed within the grace: matchable again
end
return {'ok', state, mode, cur[3] or '', cur[4] or '', previous, cur[6] or '', cur[9] or '', cur[8] or ''}
