-- forget_worker: drop a worker from the registry once its players are reaped, or on clean exit.
-- KEYS[1] workers ZSET  KEYS[2] the worker's player set   ARGV[1] worker id
-- Returns 1 when forgotten, 0 when the worker still holds players (reap them first).
if redis.call('SCARD', KEYS[2]) > 0 then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
