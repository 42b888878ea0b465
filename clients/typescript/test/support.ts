// What the tests need besides the client: the server under test (started by pytest, see
// tests/client/test_typescript.py) and HS256 tokens signed with its development secret.
import { createHmac } from "node:crypto";
import { connect as netConnect } from "node:net";

export const URL = process.env.FASTMATCH_URL ?? "ws://127.0.0.1:8080/ws";
const SECRET = process.env.FASTMATCH_SECRET ?? "";
export const TIMEOUT_MS = 1000 * Number(process.env.FASTMATCH_TEST_TIMEOUT ?? "5");

const b64 = (data: string | Buffer) => Buffer.from(data).toString("base64url");

export function token(player: string, mmr = 1500, ttlS = 600): string {
  const now = Math.floor(Date.now() / 1000);
  const signing = `${b64(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${b64(JSON.stringify({ sub: player, iat: now, exp: now + ttlS, mmr }))}`;
  return `${signing}.${b64(createHmac("sha256", SECRET).update(signing).digest())}`;
}

let run = 0;
/** Player ids unique to this run of the suite (the server and its Redis outlive one file). */
export function name(base: string): string {
  return `${base}-${process.pid}-${run++}`;
}

export async function within<T>(promise: Promise<T>, ms = TIMEOUT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no result within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** One command to the server's Redis (pytest passes its socket), in plain RESP: its first reply line. */
export async function redis(...words: string[]): Promise<string> {
  const path = process.env.FASTMATCH_REDIS_SOCKET ?? "";
  if (!path) throw new Error("FASTMATCH_REDIS_SOCKET is not set");
  const bulk = words.map((w) => `$${Buffer.byteLength(w)}\r\n${w}\r\n`).join("");
  return new Promise<string>((resolve, reject) => {
    const socket = netConnect({ path }, () => socket.write(`*${words.length}\r\n${bulk}`));
    socket.once("data", (reply) => {
      socket.end();
      resolve(reply.toString().split("\r\n")[0]);
    });
    socket.once("error", reject);
  });
}
