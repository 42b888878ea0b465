// Everything the client throws, under one root (docs/protocol.md "Errors", "Close codes").
import type { Error as ErrorMessage } from "./messages.js";

/** Close codes fastmatch sends (docs/protocol.md "Close codes"). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001, // server shutdown or drain: reconnect
  ABNORMAL: 1006, // no close frame: the connection just ended (never sent on the wire)
  POLICY: 1008, // too many invalid messages
  TOO_BIG: 1009, // a frame over max_message_bytes
  INTERNAL: 1011, // storage unavailable at the handshake, or an internal error
  RATE_LIMITED: 4008, // flooding after error{rate_limited}
  SESSION_REPLACED: 4009, // another connection of the same player won
} as const;

/** Root of every error this client throws. */
export class FastmatchClientError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** A request was made while no connection is open (reconnecting). */
export class NotConnected extends FastmatchClientError {}

/** The token function threw (its error is `cause`) or returned no string. While resuming it is
 * retried like a network failure until the grace ends. */
export class TokenUnavailable extends FastmatchClientError {
  constructor(message: string, override readonly cause?: unknown) {
    super(message);
  }
}

/** The WebSocket never opened. Browsers do not expose the HTTP status of a refused handshake
 * (401 bad token, 404 wrong path, 503 shedding load); the server's log and docs/protocol.md
 * "Handshake" say which. */
export class HandshakeFailed extends FastmatchClientError {}

/** The connection ended with close `code` (1006: without a close frame). */
export class ConnectionClosed extends FastmatchClientError {
  constructor(readonly code: number, readonly reason: string = "") {
    super(`connection closed with ${code}${reason ? ` (${reason})` : ""}`);
  }
}

/** Close 4009: the same player connected again elsewhere; that connection has the state. */
export class SessionReplaced extends ConnectionClosed {}

export function connectionClosed(code: number, reason = ""): ConnectionClosed {
  return code === CloseCode.SESSION_REPLACED ? new SessionReplaced(code, reason) : new ConnectionClosed(code, reason);
}

/** An `error` message; the subclass names its code, unknown codes get this class. */
export class ServerError extends FastmatchClientError {
  static readonly code: string = "";
  readonly code: string;
  readonly requestId: string | null;
  readonly retryAfterMs: number | null;
  constructor(readonly error: ErrorMessage) {
    super(`${error.code}: ${error.message}`);
    this.code = error.code;
    this.requestId = error.request_id ?? null;
    this.retryAfterMs = error.retry_after_ms ?? null;
  }
}

export class InvalidMessage extends ServerError { static override readonly code = "invalid_message"; }
export class UnsupportedGameMode extends ServerError { static override readonly code = "unsupported_game_mode"; }
export class AlreadyInQueue extends ServerError { static override readonly code = "already_in_queue"; }
export class NotInQueue extends ServerError { static override readonly code = "not_in_queue"; }
export class WrongSessionId extends ServerError { static override readonly code = "wrong_session_id"; }
export class InvalidState extends ServerError { static override readonly code = "invalid_state"; }
export class LoadingTimeout extends ServerError { static override readonly code = "loading_timeout"; }
export class PlayerBlocked extends ServerError { static override readonly code = "player_blocked"; }
export class RateLimited extends ServerError { static override readonly code = "rate_limited"; }
export class Unavailable extends ServerError { static override readonly code = "unavailable"; }
export class InternalError extends ServerError { static override readonly code = "internal_error"; }

export const ERROR_CLASSES: Readonly<Record<string, typeof ServerError>> = Object.fromEntries(
  [InvalidMessage, UnsupportedGameMode, AlreadyInQueue, NotInQueue, WrongSessionId, InvalidState,
    LoadingTimeout, PlayerBlocked, RateLimited, Unavailable, InternalError].map((cls) => [cls.code, cls]),
);

/** The typed error for an `error` message (for errors read from the message stream). */
export function errorFor(message: ErrorMessage): ServerError {
  // Own keys only: a code like "constructor" must not find Object's.
  const cls = Object.hasOwn(ERROR_CLASSES, message.code) ? ERROR_CLASSES[message.code]! : ServerError;
  return new cls(message);
}
