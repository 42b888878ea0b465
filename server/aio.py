"""asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio


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
