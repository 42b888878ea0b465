-- Is a worker's heartbeat deadline in the workers ZSET still ahead (Redis clock)? What a reaper
-- asks before it releases a player or forgets the worker: a worker that was only stalled and
-- heartbeats again keeps its players (server/app/housekeeping.py). Needs the clock include.
local function worker_alive(workers_key, worker_id)
  local deadline = redis.call('ZSCORE', workers_key, worker_id)
  return deadline and tonumber(deadline) > now_ms()
end
