-- changes: what changed in a mode's queue since the reader's position (issue 10; read only).
-- KEYS[1] changes  KEYS[2] queue  KEYS[3] grace   ARGV[1] position (a stream id the reader
-- holds)  ARGV[2] budget: the most players the returned entries may name
-- Returns {"reload"} when the position is no longer in the stream (trimmed away, or the stream
-- was lost): changes may be missing and only a full snapshot is safe. Else {status, now_ms,
-- queue size, grace size, id1, op1, player1, ticket1, id2, ...} in the stream's order, where
-- status is "ok" when the entries reach the stream's end and "more" when the budget stopped
-- them first. The sizes are as of the newest entry, so a reader that got everything ("ok")
-- can check its pool against them.
-- The budget counts players, not entries: one `m` entry names every player a commit_matches
-- call committed (up to matching.commit_batch_players), so a count of entries alone would not
-- bound this call's cost. At least one entry is returned whatever its size.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return {'reload'}
end
--#include clock
local budget = tonumber(ARGV[2])
local out = {'ok', tostring(now_ms()), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])}
local from, named = '(' .. ARGV[1], 0
while true do
  -- Small reads: a run of big `m` entries costs little more than the budget.
  local want = math.min(budget - named, 64)
  local entries = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', math.max(want, 1))
  for _, entry in ipairs(entries) do
    local f = entry[2]
    out[#out + 1] = entry[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[4]
    out[#out + 1] = f[6] or ''
    from = '(' .. entry[1]
    if f[2] == 'm' then
      named = named + 1 + select(2, string.gsub(f[4], ',', ','))
    else
      named = named + 1
    end
    if named >= budget then
      out[1] = 'more'
      return out
    end
  end
  if #entries < want or #entries == 0 then
    return out
  end
end
