// What the tests need besides the client: the server under test (started by pytest, see
// tests/client/test_typescript.py) and HS256 tokens signed with its development secret.
import { createHmac } from "node:crypto";

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
