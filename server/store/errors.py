"""Errors of the storage layer, classified so callers can answer PROTOCOL's `unavailable`."""

from server.errors import FastmatchError


class StoreError(FastmatchError):
    """A Redis call failed in a way that retrying the same request will not fix."""


class StoreUnavailable(StoreError):
    """Redis is unreachable, timed out, or the circuit is open: retry later.

    ``maybe_ran``: the call left for Redis and no answer came (a timeout, a connection lost
    in flight): Redis may have run it, so whoever made it owns settling the outcome."""

    def __init__(self, message: str, retry_after_ms: int = 1000, maybe_ran: bool = False) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.maybe_ran = maybe_ran


class ProtocolViolation(StoreError):
    """A script replied with a shape we do not know: a bug or a version mismatch, never a crash."""
