"""asyncio helpers that several edges share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def uninterrupted(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile; the
    cancellation is then delivered at the caller's next await.

    For steps whose outcome must be known and recorded: a libvirt call running in a worker
    thread, or the clean-up that decides whether a file QEMU may use can be removed.
    """
    future = asyncio.ensure_future(awaitable)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():  # it never ran (its pool shut down): nothing happened
                raise
            cancelled = True
        except BaseException:
            pass
    if cancelled:
        task = asyncio.current_task()
        if task is not None:
            task.cancel()
    return future.result()


def quietly_ended(task: asyncio.Future[Any]) -> None:
    """Done-callback for a task cut short on purpose: its error is retrieved, not logged
    as never retrieved."""
    if not task.cancelled():
        task.exception()
