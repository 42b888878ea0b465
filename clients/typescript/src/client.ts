// One player's connection to fastmatch (docs/protocol.md): requests, the message stream, the
// ready check, resumes. Runs on the browser's WebSocket and on Node's global WebSocket
// (Node 22+, or Node 20 with --experimental-websocket); no runtime dependencies.
import {
  ConnectionClosed, FastmatchClientError, HandshakeFailed, NotConnected, RateLimited, ServerError,
  Unavailable, connectionClosed, errorFor,
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
  openTimeoutMs?: number;
  /** A WebSocket implementation; defaults to `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
}

const RESUMABLE = new Set([1001, 1006, 1011, 1012, 1013, 1014]);
const BACKOFF_BASE_MS = 100;
const BACKOFF_MAX_MS = 2000;
const DROPPED = 4000; // the close code drop() uses; the server treats every close alike

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
  private waiter: (() => void) | null = null;
  private readonly pending = new Map<string, Waiting<ServerMessage>>();
  private nextId = 1;
  private answered: string | null = null;
  private closing = false;
  private finished = false;
  private terminal: FastmatchClientError | null = null;
  private readonly done: Promise<void>;
  private markDone!: () => void;
  private autoReadyFlag: boolean;

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
    const rid = requestId ?? this.newId();
    return this.request({ type: "enqueue", game_mode: gameMode, request_id: rid }, rid, "enqueued");
  }

  dequeue(requestId?: string): Promise<Dequeued> {
    const rid = requestId ?? this.newId();
    return this.request({ type: "dequeue", request_id: rid }, rid, "dequeued");
  }

  status(requestId?: string): Promise<QueueStatus> {
    const rid = requestId ?? this.newId();
    return this.request({ type: "status", request_id: rid }, rid, "queue_status");
  }

  /** Answer the ready check now. Success has no direct answer: `match_found` or `requeued`
   * follows; errors arrive as messages. */
  loadingComplete(loadingSessionId?: string): void {
    const sid = loadingSessionId ?? this.loadingSessionId;
    if (!sid) throw new FastmatchClientError("no ready check is running");
    this.answer(sid);
  }

  /** Send one message without waiting for an answer (a string goes out verbatim: meant for
   * testing how a server handles bad input). */
  send(message: ClientMessage | string): void {
    this.liveSocket().send(typeof message === "string" ? message : JSON.stringify(message));
    this.messagesSent += 1;
  }

  private request<T extends ServerMessage>(message: ClientMessage, rid: string, answer: T["type"]): Promise<T> {
    const ws = this.liveSocket();
    return new Promise<ServerMessage>((resolve, reject) => {
      this.pending.set(rid, { resolve, reject });
      ws.send(JSON.stringify(message));
      this.messagesSent += 1;
    }).then((reply) => {
      if (reply.type !== answer) throw new FastmatchClientError(`request ${rid} was answered with ${reply.type}`);
      return reply as T;
    });
  }

  private newId(): string { return `c${this.nextId++}`; }

  private liveSocket(): WebSocketLike {
    if (this.ws === null || !this.established) {
      if (this.finished) throw this.terminal ?? new ConnectionClosed(1000, "closed by the client");
      throw new NotConnected("not connected (reconnecting)");
    }
    return this.ws;
  }

  private answer(sid: string): void {
    if (sid === this.answered || this.ws === null) return;
    this.answered = sid;
    this.ws.send(JSON.stringify({ type: "loading_complete", loading_session_id: sid }));
    this.messagesSent += 1;
  }

  // -- the message stream --------------------------------------------------------------------

  /** The next server message; rejects with ConnectionClosed once the client is finished. */
  async recv(): Promise<ServerMessage> {
    while (this.inbox.length === 0) {
      if (this.finished) throw this.terminal ?? new ConnectionClosed(1000, "closed by the client");
      await new Promise<void>((resolve) => { this.waiter = resolve; });
    }
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
    if (this.ws !== null && this.established) {
      this.ws.close(1000);
      await this.done;
      return;
    }
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
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.();
  }

  // -- connecting ----------------------------------------------------------------------------

  /** One attempt: handshake and first message. */
  async connectOnce(): Promise<Welcome> {
    const source = this.options.token;
    const token = typeof source === "string" ? source : await source();
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
    const deadline = Date.now() + (this.options.resumeGraceMs ?? 10000);
    let last: FastmatchClientError = connectionClosed(code, reason);
    let attempt = 0;
    let atLeast = 0;
    for (;;) {
      const delay = Math.max(Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt), atLeast);
      if (Date.now() + delay >= deadline) break;
      await new Promise((resolve) => setTimeout(resolve, delay));
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
        } else if (error instanceof ServerError && !(error.code === "internal_error")) {
          this.finish(error);
          return;
        } else if (error instanceof FastmatchClientError) {
          last = error;  // HandshakeFailed (503 while draining, a restart), 1006, internal_error
        } else {
          throw error;
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
    if (typeof message !== "object" || message === null || typeof message.type !== "string") return;
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
      case "error":
        if (message.code === "loading_timeout") {
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
      void this.resume(code, reason);
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
