-- changes: what changed in a mode's queue since the reader's position (issue 10; read only).
-- KEYS[1] changes  KEYS[2] queue  KEYS[3] grace   ARGV[1] position (a stream id the reader
-- holds)  ARGV[2] budget: entries to return, an `m` entry counting one more per KiB of its
-- player list (the last entry may take it over; at least one is returned whatever its size)
-- Returns {"reload"} when the position is no longer in the stream (trimmed away, or the stream
-- was lost): changes may be missing and only a full snapshot is safe. Else {status, now_ms,
-- queue size, grace size, id1, op1, player1, ticket1, id2, ...} in the stream's order, where
-- status is "ok" when the entries reach the stream's end and "more" when the budget stopped
-- them first. The sizes are as of the newest entry, so a reader that got everything ("ok")
-- can check its pool against them.
-- One `m` entry names every player a commit_matches call committed (up to
-- matching.commit_batch_players), so a count of entries alone would not bound this call's cost;
-- its bytes do (counting its players instead made a big drain's reads many and tiny).
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return {'reload'}
end
--#include clock
local budget = tonumber(ARGV[2])
local out = {'ok', tostring(now_ms()), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])}
local from, spent, largest = '(' .. ARGV[1], 0, 1
local want = math.max(math.min(budget, 8), 1)
while true do
  local entries = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', want)
  for _, entry in ipairs(entries) do
    local f = entry[2]
    out[#out + 1] = entry[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[4]
    out[#out + 1] = f[6] or ''
    from = '(' .. entry[1]
    local size = 1
    if f[2] == 'm' then
      size = 1 + math.floor(#f[4] / 1024)
    end
    spent = spent + size
    largest = math.max(largest, size)
    if spent >= budget then
      out[1] = 'more'
      return out
    end
  end
  if #entries < want then
    return out
  end
  -- The next read: as many entries as the budget left would take if each were as big as the
  -- biggest seen (so a run of big `m` entries is not read 64 at a time), 64 at most.
  want = math.max(math.min(math.floor((budget - spent) / largest), 64), 1)
end
