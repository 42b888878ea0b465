-- The Redis clock in milliseconds: every wait and deadline uses it, so all hosts agree.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
