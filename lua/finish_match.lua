-- finish_match: every way a match ends, in one script so exactly one outcome wins
-- (DESIGN invariant 4; seeds plan 3: a status field checked first, never a delete under a race).
-- KEYS[1] match  KEYS[2] loading ZSET  KEYS[3] queue  KEYS[4] tickets  KEYS[5] grace
--      then the player hash of each player, then the penalty ZSET of each player (same order)
-- ARGV[1] action: "cancel" | "abort" | "expire" | "fail" | "assign"
-- ARGV[2] match id  ARGV[3] players, comma-separated, as the caller read them
-- ARGV[4] resume grace ms  ARGV[5] penalty window ms  ARGV[6] finished-record ttl ms
-- ARGV[7] cancel: the leaving player; fail: the reason; assign: server address
-- ARGV[8] assign: server session id  ARGV[9] delivery channel prefix (keys.DELIVERY_PREFIX)
-- Each player is told its outcome on its worker's channel: requeued, dequeued{removed} (the
-- leaver), error{loading_timeout}, or match_found.
-- Returns {"retry"} when ARGV[3] is not the match's player list (re-read, call again)
--       | {"absent"} | {"not_due"} | {"final", status} (already ended: nothing changes)
--       | {"done", status, reason, routes...} with routes in fives:
--         player, worker, conn, what ("requeued" | "removed" | "timed_out" | "matched"), queued_at
-- Transitions: cancel: loading|allocating -> cancelled (the leaver removed with a penalty,
-- the others requeued, player_left; nothing happens if the leaver has reconnected meanwhile); abort (the leaver's worker is shutting down, not the
-- player's doing): loading|allocating -> cancelled, everyone requeued, server_shutdown; expire: loading past deadline -> timed_out (ready players
-- requeued, loading_timeout; the others removed with a penalty), allocating past deadline ->
-- failed (all requeued, allocation_failed); fail: allocating -> failed (all requeued, reason);
-- assign: allocating -> assigned (every player's matchmaking state cleared).
local m = KEYS[1]
if redis.call('EXISTS', m) == 0 then
  return {'absent'}
end
local info = redis.call('HMGET', m, 'status', 'deadline', 'players', 'mode')
local status, deadline, player_csv, mode = info[1], tonumber(info[2]), info[3], info[4]
if player_csv ~= ARGV[3] then
  return {'retry'}
end
local action = ARGV[1]
--#include clock
local now = now_ms()
local new_status, reason
if status ~= 'loading' and status ~= 'allocating' then
  redis.call('ZREM', KEYS[2], ARGV[2])
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

local mode_json = cjson.encode(mode)
local function message(what, queued_at)
  if what == 'requeued' then
    return '{"type":"requeued","game_mode":' .. mode_json .. ',"reason":' .. cjson.encode(reason)
      .. ',"queued_at_ms":' .. queued_at .. '}'
  elseif what == 'removed' then
    return '{"type":"dequeued","game_mode":' .. mode_json .. ',"reason":"removed"}'
  elseif what == 'timed_out' then
    return '{"type":"error","code":"loading_timeout","message":"the ready check ended before '
      .. 'this client loaded; removed from matchmaking"}'
  end
  return '{"type":"match_found","loading_session_id":' .. cjson.encode(ARGV[2]) .. ',"game_mode":'
    .. mode_json .. ',"server_address":' .. cjson.encode(ARGV[7]) .. ',"server_session_id":'
    .. cjson.encode(ARGV[8]) .. ',"teams":' .. redis.call('HGET', m, 'teams') .. '}'
end

local players = {}
for p in string.gmatch(player_csv, '[^,]+') do
  players[#players + 1] = p
end
local n = #players
if action == 'cancel' then
  -- The leaver reconnected before this ran (its new connection was welcomed as loading):
  -- it has not left after all, and the ready check goes on.
  for j = 1, n do
    if players[j] == ARGV[7] and redis.call('HEXISTS', KEYS[5 + j], 'conn') == 1 then
      return {'final', status}
    end
  end
end
local out = {'done', new_status, reason}

local function route(j, what, queued_at)
  local owner = redis.call('HMGET', KEYS[5 + j], 'worker', 'conn')
  out[#out + 1] = players[j]
  out[#out + 1] = owner[1] or ''
  out[#out + 1] = owner[2] or ''
  out[#out + 1] = what
  out[#out + 1] = queued_at or ''
  notify(owner[1], owner[2], players[j], message(what, queued_at))
end

-- Back into the queue with the original queued_at: the player keeps its place.
local function requeue(j)
  local p, pkey = players[j], KEYS[5 + j]
  local cur = redis.call('HMGET', pkey, 'match', 'queued_at', 'conn')
  if cur[1] ~= ARGV[2] then
    return
  end
  redis.call('ZADD', KEYS[3], cur[2], p)
  redis.call('HSET', KEYS[4], p, redis.call('HGET', m, 't:' .. p))
  redis.call('HSET', pkey, 'state', 'queued')
  redis.call('HDEL', pkey, 'match')
  if not cur[3] then
    -- Disconnected meanwhile: the usual resume grace applies.
    redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), p)
  end
  route(j, 'requeued', cur[2])
end

-- Out of matchmaking: idle while connected, forgotten otherwise.
local function clear(j, what)
  local pkey = KEYS[5 + j]
  local cur = redis.call('HMGET', pkey, 'match', 'conn')
  if cur[1] ~= ARGV[2] then
    return
  end
  route(j, what, '')
  if cur[2] then
    redis.call('HSET', pkey, 'state', 'idle')
    redis.call('HDEL', pkey, 'mode', 'match', 'queued_at')
  else
    redis.call('DEL', pkey)
  end
end

-- A dodge: counts toward `player_blocked` (the earlier server's blacklist).
local function penalise(j)
  local key = KEYS[5 + n + j]
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, ARGV[5])
end

for j = 1, n do
  if new_status == 'assigned' then
    clear(j, 'matched')
  elseif action == 'cancel' and players[j] == ARGV[7] then
    clear(j, 'removed')
    penalise(j)
  elseif new_status == 'timed_out' and redis.call('HEXISTS', m, 'r:' .. players[j]) == 0 then
    clear(j, 'timed_out')
    penalise(j)
  else
    requeue(j)
  end
end

redis.call('HSET', m, 'status', new_status, 'reason', reason, 'ended', now)
if action == 'assign' then
  redis.call('HSET', m, 'server_address', ARGV[7], 'server_session_id', ARGV[8])
end
redis.call('ZREM', KEYS[2], ARGV[2])
-- The record stays a short while so late answers meet a clear status, then it expires.
redis.call('PEXPIRE', m, ARGV[6])
flush(ARGV[9])
return out
