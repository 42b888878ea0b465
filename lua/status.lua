-- status: the player's state, its queue's size and the Redis clock, in one read (read only).
-- KEYS[1] player hash  KEYS[2..6] queue, tickets, grace, changes, hold of the expected mode
-- (absent when none)   ARGV[1] expected mode ("" = none)
-- Returns {"retry", mode} | {"ok", state, mode, queued_at, queue_size, now_ms, held}: `held` is
-- why the mode forms no matches now (keys.hold: "game_server", "allocation_failed"), or "".
local cur = redis.call('HMGET', KEYS[1], 'state', 'mode', 'queued_at')
local mode = cur[2] or ''
if mode ~= ARGV[1] then
  return {'retry', mode}
end
local size, held = 0, ''
if mode ~= '' then
  size = redis.call('ZCARD', KEYS[2])
  held = redis.call('GET', KEYS[6]) or ''
end
--#include clock
local now = now_ms()
return {'ok', cur[1] or 'idle', mode, cur[3] or '', tostring(size), tostring(now), held}
