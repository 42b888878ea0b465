-- changes: what changed in a mode's queue since the reader's position (issue 10; read only).
-- KEYS[1] changes  KEYS[2] queue  KEYS[3] grace   ARGV[1] position (a stream id the reader
-- holds)  ARGV[2] most entries to return
-- Returns {"reload"} when the position is no longer in the stream (trimmed away, or the stream
-- was lost): changes may be missing and only a full snapshot is safe. Else {"ok", now_ms,
-- queue size, grace size, id1, op1, player1, ticket1, id2, ...} in the stream's order; the
-- sizes are as of the newest entry, so a reader that got fewer entries than it asked for can
-- check its pool against them.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return {'reload'}
end
--#include clock
local out = {'ok', tostring(now_ms()), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))) do
  local f = entry[2]
  out[#out + 1] = entry[1]
  out[#out + 1] = f[2]
  out[#out + 1] = f[4]
  out[#out + 1] = f[6] or ''
end
return out
