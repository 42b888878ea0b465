-- found_told: the match a player was assigned to while no connection held it has been told
-- (match_found right after the welcome, server/transport/connection.py), or can no longer be
-- (its match record expired): forget it, so that no later connection hears it again.
-- KEYS[1] player hash  ARGV[1] the match id told
-- Returns 1 when it was forgotten, 0 when the record names no such match (a newer one, or none).
if redis.call('HGET', KEYS[1], 'found') ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 'found', 'found_mode')
return 1
