"""Errors of the storage layer, classified so callers can answer PROTOCOL's `unavailable`."""

from server.errors import FastmatchError


class StoreError(FastmatchError):
    """A Redis call failed in a way that retrying the same request will not fix."""


class StoreUnavailable(StoreError):
    """Redis is unreachable, timed out, or the circuit is open: retry later."""

    def __init__(self, message: str, retry_after_ms: int = 1000) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class ProtocolViolation(StoreError):
    """A script replied with a shape we do not know: a bug or a version mismatch, never a crash."""
