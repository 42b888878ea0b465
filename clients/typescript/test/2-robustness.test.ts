// What must never hang, throw where a promise is expected, or outlive close(): against the
// real `fastmatch serve` that pytest starts (tests/client/test_typescript.py).
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  Client, ConnectionClosed, ServerError, TokenUnavailable, connect, errorFor,
} from "../src/index.js";
import type { ServerMessage, WebSocketConstructor, WebSocketLike } from "../src/index.js";
import { URL, name, token, within } from "./support.js";

/** The global WebSocket, counting the sockets the client opens. */
function counting(): { WebSocket: WebSocketConstructor; opened: () => number } {
  const Real = (globalThis as unknown as { WebSocket: WebSocketConstructor }).WebSocket;
  let opened = 0;
  return {
    WebSocket: class extends (Real as unknown as new (url: string) => WebSocketLike) {
      constructor(url: string) {
        super(url);
        opened += 1;
      }
    } as unknown as WebSocketConstructor,
    opened: () => opened,
  };
}

async function drained(client: Client): Promise<void> {
  await within((async () => { for await (const _ of client) { /* until it ends */ } })());
}

test("requests the server would answer with no request_id are refused before sending", async () => {
  const client = await connect(URL, { token: token(name("strict")) });
  const sent = client.messagesSent;
  // Rejections, not throws: a .catch() on the call sees them.
  await assert.rejects(client.enqueue(""), RangeError);
  await assert.rejects(client.enqueue("m".repeat(65)), RangeError);
  await assert.rejects(client.status("r".repeat(129)), RangeError);
  assert.throws(() => client.loadingComplete("s".repeat(65)), RangeError);
  assert.equal(client.messagesSent, sent);
  assert.equal((await client.status("")).type, "queue_status"); // "" means "pick one"
  const first = client.status("same");
  await assert.rejects(client.status("same"), RangeError); // that id is still waiting
  assert.equal((await first).type, "queue_status");
  await client.close();
  await assert.rejects(client.status(), ConnectionClosed); // closed: a rejection too
});

test("an unknown error code is a ServerError, whatever its name", () => {
  for (const code of ["constructor", "toString", "__proto__", "brand_new_code"]) {
    const error = errorFor({ type: "error", code, message: "m" });
    assert.ok(error instanceof ServerError && error.constructor === ServerError, code);
    assert.equal(error.code, code);
  }
});

test("two readers of the stream each get a message", async () => {
  const client = await connect(URL, { token: token(name("readers")) });
  assert.equal((await client.recv()).type, "welcome");
  const readers = [client.recv(), client.recv()];
  await client.enqueue("1v1");
  await client.dequeue();
  const got = await within(Promise.all(readers));
  assert.deepEqual(got.map((m: ServerMessage) => m.type).sort(), ["dequeued", "enqueued"]);
  await client.close();
});

test("a recv() given up through its signal takes no message", async () => {
  const client = await connect(URL, { token: token(name("giveup")) });
  assert.equal((await client.recv()).type, "welcome");
  const gaveUp = new AbortController();
  const abandoned = client.recv({ signal: gaveUp.signal });
  gaveUp.abort(new Error("gave up"));
  await assert.rejects(abandoned, /gave up/);
  await client.status();
  assert.equal((await within(client.recv())).type, "queue_status"); // not eaten by the first
  await assert.rejects(client.recv({ signal: AbortSignal.abort(new Error("already")) }), /already/);
  await client.close();
});

test("close() while a reconnect waits for its token opens no socket afterwards", async () => {
  const sockets = counting();
  let calls = 0;
  let asked!: () => void;
  const secondCall = new Promise<void>((resolve) => { asked = resolve; });
  let release!: (value: string) => void;
  const player = name("zombie");
  const client = await connect(URL, {
    WebSocket: sockets.WebSocket,
    token: () => {
      calls += 1;
      if (calls === 1) return token(player);
      asked();
      return new Promise<string>((resolve) => { release = resolve; }); // a slow token service
    },
  });
  await client.enqueue("1v1");
  client.drop();
  await within(secondCall); // the reconnect is waiting for its token now
  await client.close();
  release(token(player));
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(sockets.opened(), 1); // only the first connection's
  assert.equal(client.connected, false);
  await drained(client); // the stream ended quietly (our own close)
});

test("a token function that hangs while resuming ends the stream within the grace", async () => {
  let calls = 0;
  const player = name("hanging");
  const client = await connect(URL, {
    resumeGraceMs: 1000,
    openTimeoutMs: 300,
    token: () => {
      calls += 1;
      return calls > 1 ? new Promise<string>(() => { /* never answers */ }) : token(player);
    },
  });
  client.drop();
  await assert.rejects(drained(client), (error: unknown) =>
    error instanceof TokenUnavailable && /took longer than 300 ms/.test(error.message));
  assert.equal(client.connected, false);
});

test("a token function that throws while resuming ends the stream with TokenUnavailable", async () => {
  let calls = 0;
  const player = name("doomed");
  const client = await connect(URL, {
    resumeGraceMs: 1000,
    token: () => {
      calls += 1;
      if (calls > 1) throw new Error("token service down");
      return token(player);
    },
  });
  client.drop();
  await assert.rejects(drained(client), (error: unknown) =>
    error instanceof TokenUnavailable && error.cause instanceof Error);
  assert.ok(calls > 2); // retried within the grace, like a network failure
  assert.equal(client.connected, false);
});
