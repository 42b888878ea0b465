// Every error code, as its own error class, from a real `fastmatch serve` (started by pytest
// with a short ready check and a penalty threshold of 1, see tests/client/test_typescript.py).
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  AlreadyInQueue, Client, CloseCode, ConnectionClosed, HandshakeFailed, InternalError, InvalidMessage,
  InvalidState, LoadingTimeout, NotInQueue, PlayerBlocked, RateLimited, ServerError, UnsupportedGameMode,
  WrongSessionId, connect, errorFor,
} from "../src/index.js";
import { URL, name, redis, token, within } from "./support.js";

/** The next error message that answers no request (those reject the request instead). */
async function nextError(client: Client): Promise<ServerError> {
  return within((async () => {
    for await (const message of client) {
      if (message.type === "error" && !message.request_id) return errorFor(message);
    }
    throw new Error("the stream ended before an error");
  })());
}

async function closeCode(client: Client): Promise<number> {
  return within((async () => {
    try {
      for await (const _ of client) { /* drain */ }
    } catch (error) {
      if (error instanceof ConnectionClosed) return error.code;
      throw error;
    }
    return CloseCode.NORMAL;
  })());
}

test("a bad token fails the handshake", async () => {
  await assert.rejects(connect(URL, { token: "not-a-jwt", reconnect: false }), HandshakeFailed);
});

test("request errors reject with their class", async () => {
  const client = await connect(URL, { token: token(name("eve")) });
  await assert.rejects(client.enqueue("chess", "x"), (error: unknown) =>
    error instanceof UnsupportedGameMode && error.requestId === "x" && error.code === "unsupported_game_mode");
  await assert.rejects(client.dequeue(), NotInQueue);
  client.loadingComplete("m1");  // no ready check running: the error arrives as a message
  assert.ok((await nextError(client)) instanceof InvalidState);
  client.send('{"type": "teleport"}');
  assert.ok((await nextError(client)) instanceof InvalidMessage);
  await client.enqueue("5v5");
  await assert.rejects(client.enqueue("1v1"), AlreadyInQueue);
  await client.dequeue();
  await client.close();
});

test("the server's answer corrects a state Redis lost", async () => {
  // The client believes it is queued; Redis lost the ticket (a restart without persistence).
  // `not_in_queue` (the answer to `dequeue`) says the player is idle, and `state` follows.
  const player = name("lost");
  const client = await connect(URL, { token: token(player, 100_000) });
  await client.enqueue("1v1");
  assert.equal(client.state, "queued");
  const lose = "redis.call('ZREM', KEYS[1], ARGV[1]); redis.call('HDEL', KEYS[2], ARGV[1]); "
    + "redis.call('HSET', KEYS[3], 'state', 'idle'); redis.call('HDEL', KEYS[3], 'mode', 'queued_at'); return 1";
  assert.equal(await redis("EVAL", lose, "3", "{mm:1v1}:queue", "{mm:1v1}:tickets",
    `fm:player:{${player}}`, player), ":1");
  await assert.rejects(client.dequeue(), NotInQueue);
  assert.equal(client.state, "idle");
  await client.close();
});

test("a generated request id is never one the caller has waiting", async () => {
  const client = await connect(URL, { token: token(name("ids")) });
  const [named, generated] = await Promise.all([client.status("c1"), client.status()]);
  assert.equal(named.request_id, "c1");
  assert.notEqual(generated.request_id, "c1");
  await client.close();
});

test("wrong session, loading timeout, then blocked", async () => {
  const afk = await connect(URL, { token: token(name("afk")) });
  const ok = await connect(URL, { token: token(name("ok")), autoReady: true });
  await afk.enqueue("1v1");
  await ok.enqueue("1v1");
  await within((async () => { for await (const m of afk) if (m.type === "start_loading") return; })());
  await assert.rejects(afk.dequeue(), InvalidState);  // a loading match cannot be left
  afk.loadingComplete("not-this-one");
  assert.ok((await nextError(afk)) instanceof WrongSessionId);
  assert.ok((await nextError(afk)) instanceof LoadingTimeout);
  assert.equal(afk.state, "idle");
  await assert.rejects(afk.enqueue("1v1"), (error: unknown) =>
    error instanceof PlayerBlocked && (error.retryAfterMs ?? 0) > 0);
  await Promise.all([afk.close(), ok.close()]);
});

test("a flood is rate limited, then closed with 4008", async () => {
  const client = await connect(URL, { token: token(name("flood")), reconnect: false });
  const answers = await Promise.allSettled(Array.from({ length: 60 }, () => client.status()));
  const limited = answers.filter((a) => a.status === "rejected" && a.reason instanceof RateLimited);
  assert.ok(limited.length > 0);
  assert.equal(await closeCode(client), CloseCode.RATE_LIMITED);
});

test("too many invalid messages close with 1008", async () => {
  const client = await connect(URL, { token: token(name("spam")), reconnect: false });
  for (let i = 0; i < 11; i++) client.send("{{{");  // the default budget is 10
  assert.equal(await closeCode(client), CloseCode.POLICY);
});

test("an internal error at connect", async () => {
  // pytest made this player's Redis record unreadable before the suite started.
  await assert.rejects(connect(URL, { token: token("ts-broken"), reconnect: false }), InternalError);
});
