-- commit_matches: the fenced TryMatch commit of a batch of matches (DESIGN invariants 2 and 3).
-- KEYS[1] leader  KEYS[2] queue  KEYS[3] tickets  KEYS[4] grace  KEYS[5] changes  KEYS[6] loading
-- KEYS[7] workers (keys.workers: heartbeat deadlines)
--         then for each match: its match key, then one player key per player
-- ARGV[1] lease token "<holder>|<epoch>"  ARGV[2] mode  ARGV[3] ready timeout ms
-- ARGV[4] delivery channel prefix (keys.DELIVERY_PREFIX)
-- ARGV[5] number of matches, then for each match: id, player count n, teams JSON, n players
-- The workers holding the players of each committed match hear a "loading" notice.
-- The committed matches' players are one `m` entry of the changes stream (one per call, not per
-- match); each poison entry an `r`.
-- Returns {"fenced"} when the caller does not hold this exact lease (nothing changes), else
-- {"ok", {committed ids}, {skipped ids}, {poisoned players}, deadline_ms}; or, when a command
-- failed midway, {"failed", committed, skipped, poisoned, deadline_ms, error}.
-- Redis keeps a script's writes when it fails midway, so the loop and each write after it run
-- under pcall: the matches committed before an error are still finished (queue, loading set,
-- changes, notices) and reported, and the caller raises the error after recording them. A
-- player whose record is not a hash is poison, not an error.
-- A match commits only if every player is still queued here, not in grace, and held by a
-- worker whose heartbeat has not lapsed; players of a skipped match stay queued. (A dead
-- worker's players wait for the reaper, which moves them into the resume grace: matched
-- before that, nobody would hear the ready check, and they would time out into a dodge
-- penalty instead of keeping their place.) A queued entry whose player record is not queued in this mode is
-- poison and is removed. Retrying after a timeout is safe: an existing match id is not redone.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'fenced'}
end
--#include clock
--#include notify
--#include changes
--#include alive
local now = now_ms()
local deadline = now + tonumber(ARGV[3])
local mode = ARGV[2]
local mode_json = cjson.encode(mode)
local epoch = string.match(ARGV[1], '|(%d+)$')
local committed, skipped, poisoned = {}, {}, {}
-- Writes shared by every committed match are made once per call, after the loop (issue 10:
-- a call commits ~50 matches, and each Redis call from Lua has a fixed cost). `taken` keeps a
-- player named by two matches of one batch from committing twice before its ZREM.
local taken, gone, loading = {}, {}, {}
local ai, ki = 6, 8
-- worker id -> heartbeat not lapsed, asked once per call; the caller (the lease's holder, the
-- token's "<holder>|") is alive by running this.
local live = {[string.match(ARGV[1], '^(.*)|%d+$')] = true}
local function held_live(worker)
  if not worker or worker == '' then
    return true  -- no worker named: the grace check above speaks for such a player
  end
  if live[worker] == nil then
    live[worker] = worker_alive(KEYS[7], worker) and true or false
  end
  return live[worker]
end
-- Usually nobody is in resume grace: then no player needs the check.
local graced = redis.call('ZCARD', KEYS[4]) > 0

local function commit_all()
  for _ = 1, tonumber(ARGV[5]) do
    local id, n, teams = ARGV[ai], tonumber(ARGV[ai + 1]), ARGV[ai + 2]
    local mkey = KEYS[ki]
    local players, pkeys = {}, {}
    for j = 1, n do
      players[j] = ARGV[ai + 2 + j]
      pkeys[j] = KEYS[ki + j]
    end
    ai = ai + 3 + n
    ki = ki + 1 + n
    if redis.call('EXISTS', mkey) == 1 then
      -- A retry: the first run committed it and told the players already.
      committed[#committed + 1] = id
    else
      local ok, owners = true, {}
      for j = 1, n do
        local p = players[j]
        if taken[p] or not redis.call('ZSCORE', KEYS[2], p)
            or (graced and redis.call('ZSCORE', KEYS[4], p)) then
          ok = false
        else
          local st = redis.pcall('HMGET', pkeys[j], 'state', 'mode', 'worker', 'conn')
          owners[j] = st
          if st.err or st[1] ~= 'queued' or st[2] ~= mode then
            redis.call('ZREM', KEYS[2], p)
            redis.call('HDEL', KEYS[3], p)
            redis.call('ZREM', KEYS[4], p)
            changed(KEYS[5], 'r', p)
            poisoned[#poisoned + 1] = p
            ok = false
          elseif not held_live(st[3]) then
            ok = false
          end
        end
      end
      if ok then
        local tickets = redis.call('HMGET', KEYS[3], unpack(players))
        local csv = table.concat(players, ',')
        local fields = {'status', 'loading', 'mode', mode, 'deadline', deadline, 'created', now,
                        'epoch', epoch, 'teams', teams, 'players', csv,
                        'size', n, 'ready', 0}
        for j = 1, n do
          fields[#fields + 1] = 't:' .. players[j]
          fields[#fields + 1] = tickets[j] or ''
        end
        -- The record (and its deadline) first: a player is never `loading` in a match that
        -- has none, or that nothing would end.
        redis.call('HSET', mkey, unpack(fields))
        loading[#loading + 1] = deadline
        loading[#loading + 1] = id
        local by_worker = {}
        for j = 1, n do
          redis.call('HSET', pkeys[j], 'state', 'loading', 'match', id)
          recipient(by_worker, owners[j][3], owners[j][4],
                    '[' .. cjson.encode(players[j]) .. ',' .. cjson.encode(owners[j][4] or '') .. ']')
          taken[players[j]] = true
          gone[#gone + 1] = players[j]
        end
        committed[#committed + 1] = id
        post('{"e":"loading","mode":' .. mode_json .. ',"match":' .. cjson.encode(id) .. ',"teams":'
          .. teams .. ',"deadline":' .. deadline, by_worker)
      else
        skipped[#skipped + 1] = id
      end
    end
  end
end
local failure
-- Each step on its own: one failing does not skip the others (the first error is reported).
local function step(f)
  local ok, err = pcall(f)
  if not ok and not failure then
    failure = tostring(err)
  end
end
step(commit_all)
step(function()
  -- In slices: unpack() of a very large batch would overflow Lua's C stack.
  for i = 1, #gone, 1000 do
    local last = math.min(i + 999, #gone)
    redis.call('ZREM', KEYS[2], unpack(gone, i, last))
    redis.call('HDEL', KEYS[3], unpack(gone, i, last))
  end
end)
step(function()
  for i = 1, #loading, 1000 do
    redis.call('ZADD', KEYS[6], unpack(loading, i, math.min(i + 999, #loading)))
  end
end)
step(function()
  if #gone > 0 then
    changed(KEYS[5], 'm', table.concat(gone, ','))
  end
end)
step(function() flush(ARGV[4]) end)
if failure then
  return {'failed', committed, skipped, poisoned, tostring(deadline), failure}
end
return {'ok', committed, skipped, poisoned, tostring(deadline)}
