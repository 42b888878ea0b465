-- Who holds a player record (PROTOCOL 1 "One connection per player"). A connection id is
-- "<worker id>.<n>" (server/transport/frontend.py); detach.lua keeps the id of the connection
-- it released in the record's `released` field while no connection holds it.
local function worker_of(conn)
  return conn and string.match(conn, '^(.*)%.%d+$')
end
-- A record no connection holds, last released by a connection of `conn`'s own worker. A worker
-- detaches only connections that ended, and a connection that replaced `conn` there would have
-- closed it: so `conn` was never replaced. Its attach was lost instead (a failover promoted a
-- replica that missed it, and the ended connection's detach then released the older record):
-- `conn` takes the record back rather than being refused as replaced.
local function released_here(released, conn)
  local worker = worker_of(released)
  return worker ~= nil and worker == worker_of(conn)
end
