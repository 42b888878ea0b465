-- finish_match: every way a match ends, in one script so exactly one outcome wins
-- (DESIGN invariant 4; seeds plan 3: a status field checked first, never a delete under a race).
-- KEYS[1] match  KEYS[2] loading ZSET  KEYS[3] queue  KEYS[4] tickets  KEYS[5] grace
--      KEYS[6] changes (a requeued player is an `a` entry, and a `g` when disconnected)
--      then the player hash of each player, then the penalty ZSET of each player (same order),
--      then the mode's `left` ZSET (keys.left: leavers waiting for their cancel), hold and
--      hold_failures (keys.hold: the leader forms no matches while it exists), and the
--      workers ZSET (keys.workers: is the worker that ran a handoff alive?)
-- ARGV[1] action: "cancel" | "abort" | "expire" | "fail" | "assign"
-- ARGV[2] match id  ARGV[3] players, comma-separated, as the caller read them
-- ARGV[4] resume grace ms  ARGV[5] penalty window ms  ARGV[6] finished-record ttl ms
-- ARGV[7] cancel: the leaving player; fail: the reason; assign: server address
-- ARGV[8] assign: server session id  ARGV[9] delivery channel prefix (keys.DELIVERY_PREFIX)
-- ARGV[10] hold after the first failed handoff (ms; doubles per failure in a row)
-- ARGV[11] the longest hold (ms)  ARGV[12] the hold when no game server listens (ms)
-- ARGV[13] "1": a PUBLISH here counts every subscriber (one node; server/store/client.py
--          `one_node`), so one that reached nobody was not heard
-- The workers holding the players hear an "ended" notice with each player's outcome:
-- requeued, removed (the leaver: dequeued{removed}), timed_out (error{loading_timeout}), or
-- matched (match_found).
-- Returns {"retry"} when ARGV[3] is not the match's player list (re-read, call again)
--       | {"absent"} | {"not_due"} | {"final", status} (already ended: nothing changes)
--       | {"done", status, reason, player1, what1, player2, what2, ...}
--         what: "requeued" | "removed" | "timed_out" | "matched"
-- Transitions: cancel: loading|allocating -> cancelled (the leaver removed with a penalty, and
-- so is another player who left it too and whose own cancel is pending; the others requeued, player_left; nothing happens if the leaver has reconnected meanwhile); abort (the leaver's worker is shutting down, not the
-- player's doing): loading|allocating -> cancelled, everyone requeued, server_shutdown (but a
-- player who left by itself, its own cancel pending, is removed and penalised as in a cancel); expire: loading past deadline -> timed_out (ready players
-- requeued, loading_timeout; the others removed with a penalty), allocating past deadline ->
-- failed (all requeued, allocation_failed; server_shutdown when the worker that ran the
-- handoff is past its heartbeat); fail: allocating -> failed (all requeued, reason);
-- assign: allocating -> assigned (every player's matchmaking state cleared).
local m = KEYS[1]
local action = ARGV[1]
local left_key, hold_key, fails_key = KEYS[#KEYS - 3], KEYS[#KEYS - 2], KEYS[#KEYS - 1]
local workers_key = KEYS[#KEYS]
-- A cancel (or abort) settles the leaver's record in `left`, whatever the match's fate.
local function settled()
  if action == 'cancel' or action == 'abort' then
    redis.call('ZREM', left_key, ARGV[2] .. '|' .. ARGV[7] .. '|' .. action)
  end
end
if redis.call('EXISTS', m) == 0 then
  settled()
  -- Gone without an outcome (evicted, deleted by hand): nothing to settle, and its entry in the
  -- loading set must not come back to the sweeper forever (DESIGN invariant 6).
  redis.call('ZREM', KEYS[2], ARGV[2])
  return {'absent'}
end
local info = redis.call('HMGET', m, 'status', 'deadline', 'players', 'mode')
local status, deadline, player_csv, mode = info[1], tonumber(info[2]), info[3], info[4]
if player_csv ~= ARGV[3] then
  return {'retry'}
end
--#include clock
--#include alive
local now = now_ms()
local new_status, reason
if status ~= 'loading' and status ~= 'allocating' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  settled()
  return {'final', status}
elseif action == 'cancel' then
  new_status, reason = 'cancelled', 'player_left'
elseif action == 'abort' then
  new_status, reason = 'cancelled', 'server_shutdown'
elseif action == 'expire' then
  if deadline > now then
    return {'not_due'}
  end
  if status == 'loading' then
    new_status, reason = 'timed_out', 'loading_timeout'
  elseif not worker_alive(workers_key, redis.call('HGET', m, 'allocator') or '') then
    -- Its handoff died with the worker that ran it: ended as that worker's drain would have
    -- ended it, with no hold; the game servers did not fail (a hold would stop the mode).
    new_status, reason = 'failed', 'server_shutdown'
  else
    new_status, reason = 'failed', 'allocation_failed'
  end
elseif action == 'fail' then
  if status ~= 'allocating' then
    return {'final', status}
  end
  new_status, reason = 'failed', ARGV[7]
elseif action == 'assign' then
  if status ~= 'allocating' then
    return {'final', status}
  end
  new_status, reason = 'assigned', ''
else
  return redis.error_reply('finish_match: unknown action ' .. tostring(action))
end


--#include notify
--#include changes

local players = {}
for p in string.gmatch(player_csv, '[^,]+') do
  players[#players + 1] = p
end
local n = #players
if action == 'cancel' then
  -- The leaver reconnected before this ran (its new connection was welcomed as loading):
  -- it has not left after all, and the ready check goes on.
  for j = 1, n do
    if players[j] == ARGV[7] and redis.call('HEXISTS', KEYS[6 + j], 'conn') == 1 then
      settled()
      return {'final', status}
    end
  end
end
local out = {'done', new_status, reason}
-- Each player's record, read once: match, queued_at, conn, worker.
local recs = {}
for j = 1, n do
  recs[j] = redis.call('HMGET', KEYS[6 + j], 'match', 'queued_at', 'conn', 'worker')
end
local by_worker = {}

local function tell(j, what, queued_at)
  out[#out + 1] = players[j]
  out[#out + 1] = what
  local conn = recs[j][3]
  if conn then
    recipient(by_worker, recs[j][4], conn, '[' .. cjson.encode(players[j]) .. ',' .. cjson.encode(conn)
      .. ',"' .. what .. '",' .. (queued_at or '0') .. ']')
  end
end

-- Back into the queue with the original queued_at: the player keeps its place.
local function requeue(j)
  local p, pkey, rec = players[j], KEYS[6 + j], recs[j]
  if rec[1] ~= ARGV[2] then
    return
  end
  local ticket = redis.call('HGET', m, 't:' .. p)
  redis.call('ZADD', KEYS[3], rec[2], p)
  redis.call('HSET', KEYS[4], p, ticket)
  redis.call('HSET', pkey, 'state', 'queued')
  redis.call('HDEL', pkey, 'match')
  changed(KEYS[6], 'a', p, ticket)
  if not rec[3] then
    -- Disconnected meanwhile: the usual resume grace applies.
    redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), p)
    changed(KEYS[6], 'g', p)
  end
  tell(j, 'requeued', rec[2])
end

-- Out of matchmaking: idle while connected, forgotten otherwise. Returns whether it cleared.
local function clear(j, what)
  local pkey, rec = KEYS[6 + j], recs[j]
  if rec[1] ~= ARGV[2] then
    return false
  end
  tell(j, what)
  if rec[3] then
    redis.call('HSET', pkey, 'state', 'idle')
    redis.call('HDEL', pkey, 'mode', 'match', 'queued_at')
  elseif what == 'matched' then
    -- Matched with no connection to tell (it dropped as the game server answered, before its
    -- cancel ran): kept for the resume grace, so that a reconnect learns of its match
    -- (lua/attach.lua `found`), and no longer than the match record that says where to play.
    redis.call('HSET', pkey, 'state', 'idle', 'found', ARGV[2], 'found_mode', mode)
    redis.call('HDEL', pkey, 'mode', 'match', 'queued_at')
    redis.call('PEXPIRE', pkey, math.max(math.min(tonumber(ARGV[4]), tonumber(ARGV[6])), 1))
  else
    redis.call('DEL', pkey)
  end
  return true
end

-- A dodge: counts toward `player_blocked` (the earlier server's blacklist).
local function penalise(j)
  local key = KEYS[6 + n + j]
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, ARGV[5])
end

for j = 1, n do
  if new_status == 'assigned' then
    clear(j, 'matched')
  elseif action == 'cancel' and players[j] == ARGV[7] then
    -- A record that moved on (or was lost) is not this ready check's to penalise.
    if clear(j, 'removed') then penalise(j) end
  elseif new_status == 'timed_out' and redis.call('HEXISTS', m, 'r:' .. players[j]) == 0 then
    if clear(j, 'timed_out') then penalise(j) end
  elseif (action == 'cancel' or action == 'abort') and not recs[j][3]
      and redis.call('ZREM', left_key, ARGV[2] .. '|' .. players[j] .. '|cancel') == 1 then
    -- Another player who left this ready check too, whose own cancel has not run yet: a
    -- leaver as well (PROTOCOL 4), not requeued into a grace with its dodge uncounted.
    if clear(j, 'removed') then penalise(j) end
  else
    requeue(j)
  end
end

local head = '{"e":"ended","mode":' .. cjson.encode(mode) .. ',"match":' .. cjson.encode(ARGV[2])
  .. ',"status":"' .. new_status .. '","reason":' .. cjson.encode(reason)
if action ~= 'assign' then
  redis.call('HSET', m, 'status', new_status, 'reason', reason, 'ended', now)
else
  redis.call('HSET', m, 'status', new_status, 'reason', reason, 'ended', now,
             'server_address', ARGV[7], 'server_session_id', ARGV[8])
  head = head .. ',"server":' .. cjson.encode(ARGV[7]) .. ',"session":' .. cjson.encode(ARGV[8])
    .. ',"teams":' .. redis.call('HGET', m, 'teams')
end
redis.call('ZREM', KEYS[2], ARGV[2])
settled()
-- Issue 16: a failed handoff holds the mode's matching for a while, so its players do not go
-- through another ready check for the same failure at once; an assignment lifts it.
if new_status == 'assigned' then
  redis.call('DEL', fails_key)
  if redis.call('GET', hold_key) == 'allocation_failed' then
    redis.call('DEL', hold_key)
  end
elseif reason == 'no_game_server' then
  -- Never in place of a failure's back-off: it would cut a long hold down to a few ticks.
  if redis.call('GET', hold_key) ~= 'allocation_failed' then
    redis.call('SET', hold_key, 'game_server', 'PX', ARGV[12])
  end
elseif reason == 'allocation_failed' and redis.call('GET', hold_key) ~= 'allocation_failed' then
  -- One step of the back-off per hold: the matches formed before it, failing together, are
  -- one failure of the fleet, not fifty doublings straight to the longest hold.
  local n = redis.call('INCR', fails_key)
  redis.call('PEXPIRE', fails_key, tonumber(ARGV[11]) * 4)
  local hold = math.min(tonumber(ARGV[10]) * 2 ^ math.min(n - 1, 20), tonumber(ARGV[11]))
  redis.call('SET', hold_key, 'allocation_failed', 'PX', math.floor(hold))
end
-- The record stays a short while so late answers meet a clear status, then it expires.
redis.call('PEXPIRE', m, ARGV[6])
post(head, by_worker)
local unheard = flush(ARGV[9])
if new_status == 'assigned' and ARGV[13] == '1' and next(unheard) then
  -- Nobody heard the match_found of a connection whose worker died (killed: its connection
  -- is in the record until the reapers release it) or is resubscribing: kept as for a player
  -- with no connection, so that the next connection hears it (lua/attach.lua); the reaper's
  -- release gives the record its expiry (lua/detach.lua).
  for j = 1, n do
    local rec = recs[j]
    if rec[1] == ARGV[2] and rec[3] and unheard[rec[4]] then
      redis.call('HSET', KEYS[6 + j], 'found', ARGV[2], 'found_mode', mode)
    end
  end
end
return out
