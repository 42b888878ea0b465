"""asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
Item = TypeVar("Item")


def cancelling() -> bool:
    """Is the current task being cancelled?

    Python 3.11's ``asyncio.timeout`` turns a cancel that lands while the timeout expires into
    ``TimeoutError``; a loop that treats that as an ordinary failure would run forever and
    hang shutdown. Loops call ``raise_if_cancelling()`` after catching a failure.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancelling() -> None:
    if cancelling():
        raise asyncio.CancelledError


async def in_batches(items: Sequence[Item], call: Callable[[Item], Awaitable[T]], size: int,
                     stop: Callable[[list[T]], bool] | None = None) -> list[T]:
    """``call`` for every item, ``size`` at a time (calls issued together leave in one write to
    Redis, and a batch bounds what is in flight). The first failure is raised once its batch
    has settled, so nothing is left running behind the caller; ``stop`` may end it after any
    batch."""
    results: list[T] = []
    for start in range(0, len(items), size):
        settled = await asyncio.gather(*(call(item) for item in items[start:start + size]),
                                       return_exceptions=True)
        batch: list[T] = []
        for outcome in settled:
            if isinstance(outcome, BaseException):
                raise outcome
            batch.append(outcome)
        results += batch
        if stop is not None and stop(batch):
            break
    return results
