// Storage unavailable: pytest passes the pid of the server's Redis; stopping it makes every
// Redis call time out. Runs last: the other files need a working Redis.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Unavailable, connect } from "../src/index.js";
import { URL, name, token } from "./support.js";

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
