-- snapshot: one chunk of a mode's matchable candidates, in queue order (read only).
-- KEYS[1] queue  KEYS[2] tickets  KEYS[3] grace   ARGV[1] start rank  ARGV[2] count
-- Returns {now_ms, scanned, player1, ticket1, player2, ticket2, ...}. Players in resume grace
-- are left out (not matchable); a queued player without a ticket comes back with "" so the
-- decoder reports it as poison. `scanned` < count means the end of the queue was reached.
--#include clock
local now = now_ms()
local start = tonumber(ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], start, start + tonumber(ARGV[2]) - 1)
local out = {tostring(now), tostring(#members)}
-- Usually nobody is in resume grace: then no member needs the check.
local graced = redis.call('ZCARD', KEYS[3]) > 0
for _, p in ipairs(members) do
  if not (graced and redis.call('ZSCORE', KEYS[3], p)) then
    out[#out + 1] = p
    out[#out + 1] = redis.call('HGET', KEYS[2], p) or ''
  end
end
return out
