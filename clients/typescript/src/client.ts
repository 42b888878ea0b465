// One player's connection to fastmatch (docs/protocol.md): requests, the message stream, the
// ready check, resumes. Runs on the browser's WebSocket and on Node's global WebSocket
// (Node 22+, or Node 20 with --experimental-websocket); no runtime dependencies.
import {
  ConnectionClosed, ERROR_CLASSES, FastmatchClientError, HandshakeFailed, NotConnected, RateLimited,
  ServerError, TokenUnavailable, Unavailable, connectionClosed, errorFor,
} from "./errors.js";
import type {
  ClientMessage, Dequeued, Enqueued, Error as ErrorMessage, QueueStatus, ServerMessage, Welcome,
} from "./messages.js";

export type Token = string | (() => string | Promise<string>);
export type PlayerState = Welcome["state"];

/** The part of the WebSocket API the client uses (the browser's and Node's both have it). */
export interface WebSocketLike {
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ConnectOptions {
  /** A JWT, or a function returning one (called again for every reconnect). Sent as `?token=`,
   * the one way a browser WebSocket can carry it. */
  token: Token;
  /** Answer every ready check (`start_loading`) with `loading_complete` at once. */
  autoReady?: boolean;
  /** Resume after an unexpected drop (close 1001/1006/1011-1014) within `resumeGraceMs`. */
  reconnect?: boolean;
  /** The server's `server.resume_grace_ms` (default 10 s): a queued player keeps its place
   * only if it comes back within it. */
  resumeGraceMs?: number;
  /** How long one attempt may take from the socket's creation to the `welcome` (10 s). */
  openTimeoutMs?: number;
  /** How long `close()` waits for the server's closing handshake before it lets go (5 s). */
  closeTimeoutMs?: number;
  /** A WebSocket implementation; defaults to `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
}

const RESUMABLE = new Set([1001, 1006, 1011, 1012, 1013, 1014]);
const BACKOFF_BASE_MS = 100;
const BACKOFF_MAX_MS = 2000;
const DROPPED = 4000; // the close code drop() uses; the server treats every close alike
// Errors that say a loading_complete did not happen for a passing reason: autoReady sends it
// again, after the error's retry_after_ms (or this default).
const ANSWER_AGAIN = new Set(["unavailable", "rate_limited", "internal_error"]);
const ANSWER_AGAIN_MS = 1000;
// Errors that answer a loading_complete: those above, and those that refuse it for good.
const ANSWER_ERRORS = new Set([...ANSWER_AGAIN, "wrong_session_id", "invalid_state"]);
// A code this client does not know (a newer server's) counts as internal_error
// (docs/protocol.md "Errors").
const asKnown = (code: string): string => (Object.hasOwn(ERROR_CLASSES, code) ? code : "internal_error");
// Every server message type; a newer server's others are skipped (docs/protocol.md section 2).
// A Record, so the compiler says when the generated types gain or lose one.
const SERVER_TYPES: Readonly<Record<ServerMessage["type"], true>> = {
  welcome: true, enqueued: true, dequeued: true, start_loading: true, match_found: true,
  requeued: true, queue_status: true, error: true,
};
const SHORT_MAX = 64; // game_mode, loading_session_id: 1-64 characters (docs/protocol.md section 2)
const REQUEST_ID_MAX = 128;

/** What the server would refuse with an `invalid_message` that names no request, and so
 * would leave the request waiting forever: refused here, before anything is sent. */
function checkOutgoing(message: ClientMessage): void {
  const chars = (text: string) => [...text].length; // code points, as the server counts
  for (const field of ["game_mode", "loading_session_id"] as const) {
    const value = (message as Partial<Record<typeof field, string>>)[field];
    if (value !== undefined && (chars(value) < 1 || chars(value) > SHORT_MAX)) {
      throw new RangeError(`${field} must be 1-${SHORT_MAX} characters (docs/protocol.md section 3)`);
    }
  }
  if (message.request_id != null && chars(message.request_id) > REQUEST_ID_MAX) {
    throw new RangeError(`request_id must be at most ${REQUEST_ID_MAX} characters`);
  }
}
interface Waiting<T> {
  resolve: (value: T) => void;
  reject: (error: Error) => void;
}

export class Client implements AsyncIterable<ServerMessage> {
  /** The `welcome` of the current (or last) connection. */
  welcome: Welcome | null = null;
  state: PlayerState = "idle";
  gameMode: string | null = null;
  loadingSessionId: string | null = null;
  closeCode: number | null = null;
  closeReason = "";
  messagesSent = 0;
  messagesReceived = 0;

  private ws: WebSocketLike | null = null;
  private established = false;
  private opening: Waiting<Welcome> | null = null;
  private readonly inbox: ServerMessage[] = [];
  private waiters: (() => void)[] = []; // every recv() waiting; all are woken
  private readonly pending = new Map<string, Waiting<ServerMessage>>();
  private nextId = 1;
  private answered: string | null = null;
  private closing = false;
  private finished = false;
  private terminal: FastmatchClientError | null = null;
  private readonly done: Promise<void>;
  private markDone!: () => void;
  private autoReadyFlag: boolean;
  private backoff: { timer: ReturnType<typeof setTimeout>; wake: () => void } | null = null;

  constructor(readonly url: string, private readonly options: ConnectOptions) {
    this.autoReadyFlag = options.autoReady ?? false;
    this.done = new Promise((resolve) => { this.markDone = resolve; });
  }

  get playerId(): string { return this.welcome?.player_id ?? ""; }
  get connected(): boolean { return this.ws !== null && this.established; }

  /** Setting it answers the ready check running now, if any. */
  get autoReady(): boolean { return this.autoReadyFlag; }
  set autoReady(value: boolean) {
    this.autoReadyFlag = value;
    if (value && this.state === "loading" && this.loadingSessionId && this.connected) {
      this.answer(this.loadingSessionId);
    }
  }

  // -- requests ------------------------------------------------------------------------------

  /** Join the queue of `gameMode`; rejects with the error's class if refused. */
  enqueue(gameMode: string, requestId?: string): Promise<Enqueued> {
    const rid = this.idFor(requestId);
    return this.request({ type: "enqueue", game_mode: gameMode, request_id: rid }, rid, "enqueued");
  }

  dequeue(requestId?: string): Promise<Dequeued> {
    const rid = this.idFor(requestId);
    return this.request({ type: "dequeue", request_id: rid }, rid, "dequeued");
  }

  status(requestId?: string): Promise<QueueStatus> {
    const rid = this.idFor(requestId);
    return this.request({ type: "status", request_id: rid }, rid, "queue_status");
  }

  /** Answer the ready check now. Success has no direct answer: `match_found` or `requeued`
   * follows; errors arrive as messages. */
  loadingComplete(loadingSessionId?: string): void {
    const sid = loadingSessionId ?? this.loadingSessionId;
    if (!sid) throw new FastmatchClientError("no ready check is running");
    checkOutgoing({ type: "loading_complete", loading_session_id: sid });
    this.liveSocket(); // on the next connection, welcome{loading} brings the check back
    this.answer(sid);
  }

  /** Send one message without waiting for an answer (a string goes out verbatim: meant for
   * testing how a server handles bad input). */
  send(message: ClientMessage | string): void {
    this.liveSocket().send(typeof message === "string" ? message : JSON.stringify(message));
    this.messagesSent += 1;
  }

  private request<T extends ServerMessage>(message: ClientMessage, rid: string, answer: T["type"]): Promise<T> {
    let ws: WebSocketLike;
    try { // every failure is a rejection: `client.status().catch(...)` catches them all
      checkOutgoing(message);
      if (this.pending.has(rid)) throw new RangeError(`request_id ${rid} is already waiting for its answer`);
      ws = this.liveSocket();
    } catch (error) {
      return Promise.reject(error);
    }
    return new Promise<ServerMessage>((resolve, reject) => {
      this.pending.set(rid, { resolve, reject });
      ws.send(JSON.stringify(message));
      this.messagesSent += 1;
    }).then((reply) => {
      if (reply.type !== answer) throw new FastmatchClientError(`request ${rid} was answered with ${reply.type}`);
      return reply as T;
    });
  }

  /** The caller's request id, or a fresh one; "" too gets one: the server would echo it, and it
   * names no request. */
  private idFor(requestId?: string): string {
    if (requestId) return requestId;
    // Not one the caller chose for a request still waiting (its own ids may be "c3").
    let rid = `c${this.nextId++}`;
    while (this.pending.has(rid)) rid = `c${this.nextId++}`;
    return rid;
  }

  private liveSocket(): WebSocketLike {
    if (this.ws === null || !this.established) {
      if (this.finished) throw this.terminal ?? new ConnectionClosed(1000, "closed by the client");
      throw new NotConnected("not connected (reconnecting)");
    }
    return this.ws;
  }

  private answer(sid: string): void {
    if (sid === this.answered || this.ws === null || !this.established) return;
    this.answered = sid;
    this.ws.send(JSON.stringify({ type: "loading_complete", loading_session_id: sid }));
    this.messagesSent += 1;
  }

  /** The server did not take the ready answer: it may be sent again (`loadingComplete` would
   * otherwise skip it as sent). With `autoReady` an answer refused for a passing reason
   * (storage unavailable, a flood, an internal error) is sent again after the server's retry
   * hint, while that ready check runs: else the player would time out of it, with a dodge
   * counted, for the server's failure. */
  private answerRefused(message: ErrorMessage): void {
    const sid = this.answered;
    this.answered = null;
    if (sid === null || !this.autoReadyFlag || !ANSWER_AGAIN.has(asKnown(message.code))) return;
    setTimeout(() => {
      if (this.state === "loading" && this.loadingSessionId === sid && this.established) this.answer(sid);
    }, message.retry_after_ms ?? ANSWER_AGAIN_MS);
  }

  // -- the message stream --------------------------------------------------------------------

  /** The next server message; rejects with ConnectionClosed once the client is finished.
   * A caller that may stop waiting (a timeout, `Promise.race`) passes a `signal`: once it is
   * aborted the call rejects with its reason and takes no message. Without one, a `recv()`
   * nobody awaits any more still takes the next message when it comes, and nobody sees it. */
  async recv(options: { signal?: AbortSignal } = {}): Promise<ServerMessage> {
    const { signal } = options;
    while (this.inbox.length === 0) {
      signal?.throwIfAborted();
      if (this.finished) throw this.terminal ?? new ConnectionClosed(1000, "closed by the client");
      await new Promise<void>((resolve, reject) => {
        const wake = (): void => {
          signal?.removeEventListener("abort", aborted);
          resolve();
        };
        const aborted = (): void => {
          this.waiters = this.waiters.filter((w) => w !== wake);
          reject(signal?.reason);
        };
        this.waiters.push(wake);
        signal?.addEventListener("abort", aborted, { once: true });
      });
    }
    signal?.throwIfAborted();
    return this.inbox.shift() as ServerMessage;
  }

  /** Every server message in order, answers to requests included. Ends after close();
   * throws ConnectionClosed when the server ended the session. */
  async *[Symbol.asyncIterator](): AsyncIterator<ServerMessage> {
    for (;;) {
      try {
        yield await this.recv();
      } catch (error) {
        if (error instanceof ConnectionClosed && this.finished && this.terminal === null) return;
        throw error;
      }
    }
  }

  // -- closing -------------------------------------------------------------------------------

  /** Close the connection (1000) and stop reconnecting; safe to call twice. */
  async close(): Promise<void> {
    this.closing = true;
    const backoff = this.backoff; // a reconnect waiting out its backoff stops now
    if (backoff !== null) {
      clearTimeout(backoff.timer);
      backoff.wake();
    }
    if (this.ws !== null && this.established) {
      const ws = this.ws;
      ws.close(1000);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<void>((resolve) => { timer = setTimeout(resolve, this.options.closeTimeoutMs ?? 5000); });
      await Promise.race([this.done, late]);
      clearTimeout(timer);
      if (!this.finished) { // no closing handshake in time (a dead network): let go
        this.abandon(ws);
        this.finish(null);
      }
      return;
    }
    const opening = this.opening; // an attempt still opening is given up at once
    this.opening = null;
    opening?.reject(new ConnectionClosed(1000, "closed by the client"));
    if (this.ws !== null) this.abandon(this.ws);
    this.finish(null);
  }

  /** End the connection as a network failure would, to exercise resumes: the client treats it
   * as a drop and, with `reconnect`, comes back within the grace. */
  drop(): void {
    if (this.ws !== null) {
      this.ws.close(DROPPED, "dropped");
    }
  }

  private finish(terminal: FastmatchClientError | null): void {
    if (this.finished) return;
    this.finished = true;
    this.terminal = terminal;
    this.failPending(terminal ?? new ConnectionClosed(1000, "closed by the client"));
    this.wake();
    this.markDone();
  }

  private failPending(error: FastmatchClientError): void {
    for (const waiting of this.pending.values()) waiting.reject(error);
    this.pending.clear();
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const waiter of waiters) waiter();
  }

  // -- connecting ----------------------------------------------------------------------------

  /** One attempt: handshake and first message. */
  async connectOnce(): Promise<Welcome> {
    const source = this.options.token;
    const token = typeof source === "string" ? source : await freshToken(source, this.options.openTimeoutMs ?? 10000);
    if (this.closing) throw new ConnectionClosed(1000, "closed by the client"); // while it waited
    const WS = (this.options.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket) as
      WebSocketConstructor | undefined;
    if (WS === undefined) {
      throw new FastmatchClientError("no WebSocket: pass options.WebSocket, or run Node 20 with --experimental-websocket");
    }
    const separator = this.url.includes("?") ? "&" : "?";
    const ws = new WS(`${this.url}${separator}token=${encodeURIComponent(token)}`);
    this.ws = ws;
    this.established = false;
    let opened = false;
    return new Promise<Welcome>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.opening = null;
        this.abandon(ws);
        reject(new HandshakeFailed(`no welcome within ${this.options.openTimeoutMs ?? 10000} ms`));
      }, this.options.openTimeoutMs ?? 10000);
      this.opening = {
        resolve: (welcome) => { clearTimeout(timer); resolve(welcome); },
        reject: (error) => { clearTimeout(timer); this.abandon(ws); reject(error); },
      };
      const notOpened = (code: number, reason: string) => {
        const opening = this.opening;
        this.opening = null;
        this.ws = null;
        this.closeCode = code;
        this.closeReason = reason;
        opening?.reject(opened ? connectionClosed(code, reason)
          : new HandshakeFailed(`the WebSocket handshake failed (${code}); docs/protocol.md "Handshake" lists the HTTP refusals`));
      };
      ws.onopen = () => { opened = true; };
      // Node 20's WebSocket reports a refused handshake with `error` and never `close`.
      ws.onerror = () => { if (ws === this.ws && !opened) notOpened(1006, ""); };
      ws.onmessage = (event) => { if (ws === this.ws) this.onFrame(event.data); };
      ws.onclose = (event) => {
        if (ws !== this.ws) return;
        if (!this.established) {
          notOpened(event.code, event.reason);
          return;
        }
        this.onClose(event.code, event.reason);
      };
    });
  }

  private abandon(ws: WebSocketLike): void {
    ws.onmessage = ws.onclose = ws.onopen = ws.onerror = null;
    try { ws.close(); } catch { /* already closed */ }
    if (this.ws === ws) this.ws = null;
  }

  private async resume(code: number, reason: string): Promise<void> {
    const deadline = performance.now() + (this.options.resumeGraceMs ?? 10000); // monotonic
    let last: FastmatchClientError = connectionClosed(code, reason);
    let attempt = 0;
    let atLeast = 0;
    for (;;) {
      const delay = Math.max(Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt), atLeast);
      if (performance.now() + delay >= deadline) break;
      await new Promise<void>((resolve) => {
        this.backoff = { timer: setTimeout(resolve, delay), wake: resolve };
      });
      this.backoff = null;
      if (this.closing) return;
      attempt += 1;
      atLeast = 0;
      try {
        await this.connectOnce();
        return;
      } catch (error) {
        if (this.closing) return;
        if (error instanceof Unavailable || error instanceof RateLimited) {
          last = error;
          atLeast = error.retryAfterMs ?? 0;
        } else if (error instanceof ConnectionClosed && !RESUMABLE.has(error.code)) {
          this.finish(error);
          return;
        } else if (error instanceof ServerError && error.code !== "internal_error"
            && Object.hasOwn(ERROR_CLASSES, error.code)) {
          this.finish(error);  // an unknown code counts as internal_error: retried
          return;
        } else if (error instanceof FastmatchClientError) {
          // HandshakeFailed (503 while draining, a restart), 1006, internal_error, a token
          // function that failed (the service minting tokens may be back in a moment)
          last = error;
        } else {
          throw error;  // not ours (a bug, a WebSocket constructor refusing the URL): onClose ends the stream
        }
      }
    }
    this.finish(last);
  }

  // -- incoming ------------------------------------------------------------------------------

  private onFrame(data: unknown): void {
    let message: ServerMessage;
    try {
      message = JSON.parse(String(data)) as ServerMessage;
    } catch {
      return;  // not JSON: not from a fastmatch server
    }
    if (typeof message !== "object" || message === null || typeof message.type !== "string"
        || !Object.hasOwn(SERVER_TYPES, message.type)) {
      return; // a newer server's message type: skipped, as the protocol asks
    }
    this.messagesReceived += 1;
    if (!this.established) {
      const opening = this.opening;
      if (message.type === "error") {
        this.opening = null;
        opening?.reject(errorFor(message));  // refused at connect: no welcome
        return;
      }
      if (message.type === "welcome") {
        this.established = true;
        this.opening = null;
        opening?.resolve(message);
      }
    }
    this.follow(message);
    this.inbox.push(message);
    this.wake();
  }

  /** Track the player's state (docs/protocol.md "Lifecycle"); answer ready checks. */
  private follow(message: ServerMessage): void {
    switch (message.type) {
      case "start_loading":
        this.state = "loading";
        this.gameMode = message.game_mode;
        this.loadingSessionId = message.loading_session_id;
        if (this.autoReadyFlag) this.answer(message.loading_session_id);
        break;
      case "match_found":
      case "dequeued":
        this.state = "idle";
        this.gameMode = this.loadingSessionId = null;
        break;
      case "enqueued":
      case "requeued":
        this.state = "queued";
        this.gameMode = message.game_mode;
        this.loadingSessionId = null;
        break;
      case "welcome":
        this.welcome = message;
        this.state = message.state;
        this.gameMode = message.game_mode ?? null;
        this.loadingSessionId = message.loading_session_id ?? null;
        this.answered = null;  // an answer sent on a lost connection may not have arrived
        if (this.autoReadyFlag && message.state === "loading" && message.loading_session_id) {
          this.answer(message.loading_session_id);
        }
        break;
      case "queue_status":
        // `status` tells the truth (it reads Redis): it corrects a state this client could
        // not follow (a ticket Redis lost, whose dequeued{removed} a server may not send).
        if (message.state !== this.state) {
          this.state = message.state;
          this.gameMode = message.game_mode ?? null;
          if (message.state !== "loading") this.loadingSessionId = null;
        }
        break;
      case "error":
        // not_in_queue: the server found no ticket, and the player is idle there now.
        if (message.code === "loading_timeout" || message.code === "not_in_queue") {
          this.state = "idle";
          this.gameMode = this.loadingSessionId = null;
        }
        this.settleError(message);
        return;
      default:
        break;
    }
    const rid = "request_id" in message ? message.request_id : null;
    if (rid) {
      const waiting = this.pending.get(rid);
      this.pending.delete(rid);
      waiting?.resolve(message);
    }
  }

  private settleError(message: ErrorMessage): void {
    if (message.request_id == null && this.answered !== null && this.state === "loading"
        && ANSWER_ERRORS.has(asKnown(message.code)) && !(message.code === "rate_limited" && this.pending.size > 0)) {
      // The ready answer refused: it carries no request_id, and every request of this client
      // does (a refused flood frame echoes none: with none waiting, it was this).
      this.answerRefused(message);
      return;
    }
    let key = message.request_id ?? null;
    if (key === null && message.code === "rate_limited" && this.pending.size > 0) {
      // A refused flood frame is not echoed; frames are answered in order, so the refusal
      // belongs to the oldest request still waiting.
      key = this.pending.keys().next().value ?? null;
    }
    if (key === null) return;
    const waiting = this.pending.get(key);
    this.pending.delete(key);
    waiting?.reject(errorFor(message));
  }

  private onClose(code: number, reason: string): void {
    this.ws = null;
    this.established = false;
    this.closeCode = code;
    this.closeReason = reason;
    this.failPending(connectionClosed(code, reason));
    if (this.closing) {
      this.finish(null);
    } else if ((this.options.reconnect ?? true) && (RESUMABLE.has(code) || code === DROPPED)) {
      this.resume(code, reason).catch((error: unknown) => {  // never an unhandled rejection: the end
        this.finish(new FastmatchClientError(`reconnect failed: ${String(error)}`));
      });
    } else {
      this.finish(connectionClosed(code, reason));
    }
  }
}

/** Open a connection for the player the token names and wait for its `welcome`. Rejects with
 * HandshakeFailed, a ServerError subclass (Unavailable, RateLimited, InternalError at connect),
 * or ConnectionClosed. */
export async function connect(url: string, options: ConnectOptions): Promise<Client> {
  const client = new Client(url, options);
  await client.connectOnce();
  return client;
}

/** The token function's answer, bounded like the rest of an attempt: a token service that
 * hangs would otherwise hold a reconnect past its grace, and the stream would never end. */
async function freshToken(source: () => string | Promise<string>, timeoutMs: number): Promise<string> {
  let token: unknown;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TokenUnavailable(`the token function took longer than ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    token = await Promise.race([source(), late]);
  } catch (error) {
    if (error instanceof TokenUnavailable) throw error;
    throw new TokenUnavailable(`the token function failed: ${String(error)}`, error);
  } finally {
    clearTimeout(timer);
  }
  if (typeof token !== "string") throw new TokenUnavailable(`the token function returned ${typeof token}, not a string`);
  return token;
}
