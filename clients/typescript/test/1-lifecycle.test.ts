// The lifecycle against a real `fastmatch serve`: two players matched through match_found, a
// resume after a dropped connection, close codes. Run by tests/client/test_typescript.py.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Client, CloseCode, SessionReplaced, connect } from "../src/index.js";
import type { MatchFound, ServerMessage } from "../src/index.js";
import { URL, name, token, within } from "./support.js";

async function until<T extends ServerMessage["type"]>(client: Client, type: T): Promise<Extract<ServerMessage, { type: T }>> {
  return within((async () => {
    for await (const message of client) {
      if (message.type === type) return message as Extract<ServerMessage, { type: T }>;
    }
    throw new Error(`the stream ended before ${type}`);
  })());
}

test("two players are matched through match_found", async () => {
  const [a, b] = [name("ann"), name("ben")];
  const ann = await connect(URL, { token: token(a), autoReady: true });
  const ben = await connect(URL, { token: token(b), autoReady: true });
  assert.equal(ann.welcome?.state, "idle");
  assert.equal(ann.playerId, a);
  const queued = await ann.enqueue("1v1");
  assert.equal(queued.type, "enqueued");
  assert.equal(ann.state, "queued");
  await ben.enqueue("1v1");
  const seen: string[] = [];
  let found: MatchFound | undefined;
  for await (const message of ann) {
    seen.push(message.type);
    if (message.type === "match_found") { found = message; break; }
  }
  assert.deepEqual(seen, ["welcome", "enqueued", "start_loading", "match_found"]);
  const other = await until(ben, "match_found");
  assert.equal(found?.loading_session_id, other.loading_session_id);
  assert.deepEqual(found?.teams.flat().sort(), [a, b].sort());
  assert.equal(ann.state, "idle");
  assert.equal(ann.messagesSent, 2);  // enqueue + the automatic loading_complete
  await Promise.all([ann.close(), ben.close()]);
  assert.equal(ann.closeCode, CloseCode.NORMAL);
});

test("the ready check is answered when the caller says so", async () => {
  const cat = await connect(URL, { token: token(name("cat")) });
  const dan = await connect(URL, { token: token(name("dan")), autoReady: true });
  await cat.enqueue("1v1");
  await dan.enqueue("1v1");
  const start = await until(cat, "start_loading");
  assert.equal(cat.loadingSessionId, start.loading_session_id);
  cat.autoReady = true;
  const found = await until(cat, "match_found");
  assert.equal(found.loading_session_id, start.loading_session_id);
  await until(dan, "match_found");
  await Promise.all([cat.close(), dan.close()]);
});

test("a dropped connection is resumed within the grace, same place in the queue", async () => {
  const client = await connect(URL, { token: token(name("gina")) });
  const queued = await client.enqueue("5v5");
  await until(client, "enqueued");
  client.drop();
  const welcome = await until(client, "welcome");
  assert.equal(welcome.state, "queued");
  assert.equal(welcome.queued_at_ms, queued.queued_at_ms);
  assert.equal((await client.status()).state, "queued");
  await client.dequeue();
  await client.close();
});

test("a second connection of the player replaces the first with 4009", async () => {
  const player = name("hal");
  const old = await connect(URL, { token: token(player) });
  await old.enqueue("5v5");
  const fresh = await connect(URL, { token: token(player) });
  assert.equal(fresh.welcome?.state, "queued");
  await assert.rejects(until(old, "match_found"), (error: unknown) =>
    error instanceof SessionReplaced && error.code === CloseCode.SESSION_REPLACED);
  assert.equal(old.connected, false);
  await fresh.dequeue();
  await fresh.close();
});

test("iteration ends after close", async () => {
  const client = await connect(URL, { token: token(name("closer")) });
  await client.close();
  await client.close();
  const rest: string[] = [];
  for await (const message of client) rest.push(message.type);
  assert.deepEqual(rest, ["welcome"]);
});
