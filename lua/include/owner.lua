-- Who holds a player record (PROTOCOL 1 "One connection per player"). A connection id is
-- "<worker id>.<n>" (server/transport/frontend.py); detach.lua keeps the id of the connection
-- it released in the record's `released` field while no connection holds it.
local function worker_of(conn)
  return conn and string.match(conn, '^(.*)%.%d+$')
end
-- A record no connection holds, last released by a connection of `conn`'s own worker.
-- `released` names the last connection that held the record (attach.lua clears it), released
-- either by its worker's detach once it ended or by the reaper's (conn "") for a worker it took
-- for dead. A worker closes (4009) a connection of its own that a newer one replaces, and a
-- closing connection takes nothing back (ClientConnection.take_back): so a live `conn` of that
-- same worker was never replaced by the released one. Its attach was lost instead (a failover
-- promoted a replica that missed it, and the older connection's detach then released the
-- record): `conn` takes the record back rather than being refused as replaced.
local function released_here(released, conn)
  local worker = worker_of(released)
  return worker ~= nil and worker == worker_of(conn)
end
