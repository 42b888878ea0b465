-- hold: may the mode's leader form matches now? (issue 16: no game server, or a failing fleet)
-- KEYS[1] the mode's hold (keys.hold)   ARGV[1] the battle request channel
-- ARGV[2] how long a "game_server" hold lasts unless a tick refreshes it (ms)
-- ARGV[3] (a cluster only) the channel's subscribers on every node, counted by the caller:
--         PUBSUB NUMSUB counts this node's alone, and a game server may listen on any node
-- Returns the reason matching is held, "" when it is not: "game_server" while nobody is
-- subscribed to the request channel (set and refreshed here, cleared here once somebody is),
-- or "allocation_failed" while finish_match's back-off after failed handoffs runs.
local listeners = tonumber(ARGV[3]) or redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
local held = redis.call('GET', KEYS[1])
if listeners == 0 then
  -- A failure's back-off is kept (not cut short when a listener comes back); once it ends,
  -- the next tick holds for game_server.
  if held ~= 'allocation_failed' then
    redis.call('SET', KEYS[1], 'game_server', 'PX', ARGV[2])
  end
  return 'game_server'
end
if held == 'game_server' then
  redis.call('DEL', KEYS[1])
  return ''
end
return held or ''
