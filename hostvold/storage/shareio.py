"""Calls into one share's files, off the event loop (SPEC section 10).

A dead NFS server puts every ``stat``, ``open`` or ``fsync`` under its mount to sleep in the
kernel, uninterruptibly, for as long as the server is away. So each share gets a small pool
of worker threads of its own: a hung share can block only its own pool, never the event
loop, the D-Bus API or another share. A call that does not return in time marks the share
hung (its callers get ``StorageUnavailable`` at once from then on); the stuck thread is left
behind, and the pool is bounded, so a dead share costs at most a few threads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any, TypeVar

from hostvold.core.aio import quietly_ended
from hostvold.core.errors import HostvoldError, NoSpace, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# what a share that went away answers with (NFS, FUSE, a lost block device)
LOST = {errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN,
        errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED, errno.ECONNRESET}


def storage_lost(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in LOST


def named_storage_error(exc: BaseException) -> HostvoldError | None:
    """The named error a caller gets for a failure of the storage itself, or None."""
    if not isinstance(exc, OSError):
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in LOST:
        return StorageUnavailable(f"the storage failed: {exc.strerror or exc}{where}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"the share is full: {exc.strerror or exc}{where}")
    return None


class SharePool:
    """A bounded set of daemon threads for one share's calls.

    Daemon threads, not :class:`concurrent.futures.ThreadPoolExecutor`: the interpreter
    joins that pool's threads at exit, and a thread stuck on a dead share never returns,
    so the daemon could never stop."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self._queue: SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, function: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            while len(self._threads) < self.workers:  # started on first use
                thread = threading.Thread(target=self._work, name=f"share-{self.name}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put((future, function))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, function = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as exc:
                    future.set_exception(exc)

    def stop(self) -> None:
        """Ask idle threads to end; threads stuck in the kernel are left (they are daemons)."""
        for _ in self._threads:
            self._queue.put(None)


class ShareIO:
    """Run blocking file calls of one share in its pool, with a time limit.

    ``gate()`` says whether the share may be touched at all (its path is down, it hung):
    it raises ``StorageUnavailable`` before anything is queued."""

    def __init__(self, address: str, gate: Callable[[], None], on_hung: Callable[[str], None],
                 on_answer: Callable[[], None], timeout: float, workers: int = 4) -> None:
        self.address = address
        self.gate = gate
        self.on_hung = on_hung
        self.on_answer = on_answer
        self.timeout = timeout
        self.pool = SharePool(address.replace("/", "_")[:12], workers)

    async def run(self, function: Callable[..., T], *args: Any,
                  timeout: float | None = None) -> T:
        self.gate()
        limit = self.timeout if timeout is None else timeout
        future = asyncio.wrap_future(self.pool.submit(lambda: function(*args)))
        future.add_done_callback(quietly_ended)  # an outcome nobody awaits is not logged
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except asyncio.CancelledError:
            await self._settle(future, limit)
            raise
        except TimeoutError:
            reason = f"no answer from share {self.address} within {limit:g} s"
            self.on_hung(reason)
            # the stuck call returning is the sign that the share is back: no polling
            future.add_done_callback(lambda _done: self.on_answer())
            raise StorageUnavailable(f"{reason}; its volumes are unavailable until it "
                                     "answers again") from None
        except OSError as exc:
            if storage_lost(exc):
                raise StorageUnavailable(f"share {self.address} failed: "
                                         f"{exc.strerror or exc}") from None
            raise

    @staticmethod
    async def _settle(future: asyncio.Future[Any], limit: float) -> None:
        """A cancelled caller waits for the call it started to end (within the time limit),
        so that what it does next (its clean-up removes the files) never races that call;
        a call still running after that is disowned (its outcome retrieved and dropped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not future.done() and (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait({future}, timeout=remaining)
            except asyncio.CancelledError:  # cancelled again: still the same cancellation
                continue
