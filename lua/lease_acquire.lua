-- lease_acquire: become the mode's matchmaking leader if nobody holds the lease.
-- KEYS[1] leader  KEYS[2] epoch   ARGV[1] holder id  ARGV[2] ttl ms
-- Returns {1, epoch} when the caller holds the lease (new, or already its own: extended),
-- else {0, current holder's epoch}. Every new acquisition increments the epoch (fencing token).
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, epoch = string.match(cur, '^(.*)|(%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(epoch)}
  end
  return {0, tonumber(epoch) or 0}
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. epoch, 'PX', ARGV[2])
return {1, epoch}
