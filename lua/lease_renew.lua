-- lease_renew: compare-and-extend; only the holder of exactly this epoch may extend.
-- KEYS[1] leader   ARGV[1] lease token "<holder>|<epoch>"  ARGV[2] ttl ms
-- Returns 1 when extended, 0 when the lease is lost (expired or taken by another epoch).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
