-- Changes of a mode's queue, appended to its `changes` stream (keys.changes) in the script that
-- makes them, so the mode's leader keeps its pool in memory and applies them in Redis' order
-- (issue 10). Spliced in by the loader where a script says `--#include changes`.
local function changed(stream, op, player, ticket)
  if ticket then
    redis.call('XADD', stream, 'MAXLEN', '~', 100000, '*', 'o', op, 'p', player, 't', ticket)
  else
    redis.call('XADD', stream, 'MAXLEN', '~', 100000, '*', 'o', op, 'p', player)
  end
end
