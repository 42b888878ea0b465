// Storage unavailable: pytest passes the pid of the server's Redis; stopping it makes every
// Redis call time out. Runs last: the other files need a working Redis.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Unavailable, connect } from "../src/index.js";
import type { Client, ServerMessage } from "../src/index.js";
import { URL, name, redis, token, within } from "./support.js";

/** `CLIENT PAUSE ms WRITE` on the server's Redis. */
async function pauseWrites(ms: number): Promise<void> {
  assert.equal(await redis("CLIENT", "PAUSE", String(ms), "WRITE"), "+OK");
}

async function next(client: Client, type: ServerMessage["type"]): Promise<ServerMessage> {
  return within((async () => {
    for await (const message of client) if (message.type === type) return message;
    throw new Error(`the stream ended before ${type}`);
  })());
}

test("a ready answer the server could not take is sent again after the retry hint", async () => {
  const slow = await connect(URL, { token: token(name("slow")) });
  const fast = await connect(URL, { token: token(name("fast")), autoReady: true });
  await slow.enqueue("1v1");
  await fast.enqueue("1v1");
  const start = await next(slow, "start_loading");
  await pauseWrites(900); // past the server's call timeout (0.5 s): the answer is refused
  slow.autoReady = true; // answers now, into the pause
  const refused = await next(slow, "error");
  assert.equal(refused.type === "error" && refused.code, "unavailable");
  const found = await next(slow, "match_found");
  assert.equal(found.type === "match_found" && found.loading_session_id,
    start.type === "start_loading" && start.loading_session_id);
  assert.ok(slow.messagesSent >= 3); // enqueue, the answer refused, the answer again
  await Promise.all([slow.close(), fast.close()]);
});

test("unavailable storage: requests and new connections get Unavailable", async () => {
  const pid = Number(process.env.FASTMATCH_REDIS_PID);
  assert.ok(pid > 0, "FASTMATCH_REDIS_PID is not set");
  const client = await connect(URL, { token: token(name("liam")) });
  process.kill(pid, "SIGSTOP");
  try {
    await assert.rejects(client.enqueue("1v1"), (error: unknown) =>
      error instanceof Unavailable && (error.retryAfterMs ?? 0) > 0);
    await assert.rejects(connect(URL, { token: token(name("mia")), reconnect: false }), Unavailable);
  } finally {
    process.kill(pid, "SIGCONT");
  }
  await client.close();
});
