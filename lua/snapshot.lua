-- snapshot: one chunk of a full read of a mode's queue, for the leader's pool (issue 10).
-- KEYS[1] queue  KEYS[2] tickets  KEYS[3] grace  KEYS[4] changes
-- ARGV[1] the chunk's exclusive lower bound on queued_at ("-inf" for the first chunk, then the
--         `next` of the previous chunk)   ARGV[2] entries per chunk (more when queued_at ties)
-- Returns {now_ms, position, next, player1, ticket1, graced1, player2, ...} in queue order:
-- `position` (first chunk only, else "") is the id of the changes stream's newest entry, so the
-- reader applies every change after it on top of the chunks; `next` is "" after the last chunk.
-- A queued player without a ticket comes back with "" (the pool reports it as poison);
-- `graced` is "1" for a player in resume grace (kept, not matchable).
-- Chunks are keyed by queued_at, not by rank: a player leaving between two chunks shifts ranks
-- and would hide another player from a rank-keyed read, while a key-keyed read misses only
-- players whose changes come after `position` (and so reach the pool through the stream). A
-- chunk always ends at a change of queued_at, so ties never straddle two chunks.
--#include clock
--#include changes
local out = {tostring(now_ms()), '', ''}
if ARGV[1] == '-inf' then
  local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
  if #newest == 0 then
    -- An empty stream has no id to resume from: a marker gives the reader one, so that a
    -- trimmed or lost stream is always noticed (its position is gone).
    changed(KEYS[4], 's', '')
    newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
  end
  out[2] = newest[1][1]
end
local count = tonumber(ARGV[2])
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, count)
local members = {}
for i = 1, #rows, 2 do
  members[#members + 1] = rows[i]
end
if #members == count then
  -- Full: the chunk ends before the last queued_at, and takes every player of that one.
  local last = rows[#rows]
  while #members > 0 and rows[#members * 2] == last do
    members[#members] = nil
  end
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], last, last)) do
    members[#members + 1] = p
  end
  out[3] = '(' .. last
end
local graced = redis.call('ZCARD', KEYS[3]) > 0
for _, p in ipairs(members) do
  out[#out + 1] = p
  out[#out + 1] = redis.call('HGET', KEYS[2], p) or ''
  out[#out + 1] = (graced and redis.call('ZSCORE', KEYS[3], p)) and '1' or ''
end
return out
