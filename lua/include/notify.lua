-- Facts about players' matchmaking, published from inside the state-changing scripts so every
-- player hears them in exactly the order Redis made the changes (a second publisher could
-- overtake). Spliced in by the loader (server/store/scripts.py) where a script says
-- `--#include notify`. One message per worker per script call; server/protocol/notices.py
-- turns the facts into client messages: the wire format lives there, not here.
local outbox = {}
-- Collect one recipient of an event; a player with no connection hears nothing (its state is
-- in Redis and its welcome shows it when it comes back).
local function recipient(by_worker, worker, conn, entry)
  if not worker or worker == '' or not conn or conn == '' then
    return
  end
  local entries = by_worker[worker]
  if not entries then
    entries = {}
    by_worker[worker] = entries
  end
  entries[#entries + 1] = entry
end
-- An event (`head` is its JSON object without the closing brace) for each worker's recipients.
local function post(head, by_worker)
  for worker, entries in pairs(by_worker) do
    local events = outbox[worker]
    if not events then
      events = {}
      outbox[worker] = events
    end
    events[#events + 1] = head .. ',"to":[' .. table.concat(entries, ',') .. ']}'
  end
end
-- Returns the workers whose channel nobody heard (PUBLISH counts the receivers): a worker
-- that died (its subscriber's connection ended with it), or one resubscribing.
local function flush(prefix)
  local unheard = {}
  for worker, events in pairs(outbox) do
    if redis.call('PUBLISH', prefix .. worker,
        '{"kind":"notices","events":[' .. table.concat(events, ',') .. ']}') == 0 then
      unheard[worker] = true
    end
  end
  return unheard
end
