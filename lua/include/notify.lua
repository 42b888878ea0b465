-- Shared by the scripts that tell players about state changes; spliced in by the loader
-- (server/store/scripts.py) where a script says `--#include notify`.
-- Notifications are published here, inside the script, so every player hears about state
-- changes in exactly the order Redis made them (a second publisher could overtake).
local outbox = {}
local function notify(worker, conn, player, message)
  if not worker or worker == '' or not conn or conn == '' then
    return
  end
  local items = outbox[worker]
  if not items then
    items = {}
    outbox[worker] = items
  end
  items[#items + 1] = '{"player":' .. cjson.encode(player) .. ',"conn":' .. cjson.encode(conn)
    .. ',"message":' .. message .. '}'
end
local function flush(prefix)
  for worker, items in pairs(outbox) do
    redis.call('PUBLISH', prefix .. worker, '{"kind":"deliver","items":[' .. table.concat(items, ',') .. ']}')
  end
end
