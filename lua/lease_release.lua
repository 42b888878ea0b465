-- lease_release: hand the lease back (graceful shutdown) so another worker takes over at once.
-- KEYS[1] leader   ARGV[1] lease token "<holder>|<epoch>"
-- Returns 1 when released, 0 when it was not ours any more.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
