-- forget_worker: drop a worker from the registry once its players are reaped, or on clean exit.
-- KEYS[1] workers ZSET  KEYS[2] the worker's player set   ARGV[1] worker id
-- ARGV[2] "1": only if the worker is still past its deadline (a reaper; a worker that came back
--         to life meanwhile stays registered)
-- Returns 1 when forgotten, 0 when the worker still holds players (reap them first) or is alive.
--#include clock
--#include alive
if redis.call('SCARD', KEYS[2]) > 0 then
  return 0
end
if ARGV[2] == '1' and worker_alive(KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
