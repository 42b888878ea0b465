// fastmatch's TypeScript client (docs/protocol.md; README "Clients").
export { Client, connect } from "./client.js";
export type { ConnectOptions, PlayerState, Token, WebSocketConstructor, WebSocketLike } from "./client.js";
export * from "./errors.js";
export type * from "./messages.js";
