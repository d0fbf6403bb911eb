"""Per-volume locks on this host.

An asyncio lock serialises operations inside the daemon; an ``flock`` on
``<state_dir>/locks/<id>.lock`` keeps any other process on this host (a second daemon, a
maintenance tool) out while we hold it. Operations on different volumes never wait on
each other.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from hostvold.core.errors import StorageUnavailable


class LocalLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def volume(self, volume_id: str, wait: bool = True,
                     brief: bool = False) -> AsyncIterator[None]:
        """Hold the lock of ``volume_id`` (a validated id) for the body. On one host a
        call always waits its turn (``wait`` and ``brief`` matter for cluster locks)."""
        lock = self._locks.setdefault(volume_id, asyncio.Lock())
        self._users[volume_id] = self._users.get(volume_id, 0) + 1
        try:
            async with lock, self._file_lock(volume_id):
                yield
        finally:
            self._users[volume_id] -= 1
            if not self._users[volume_id]:  # forget idle locks: memory stays O(busy volumes)
                del self._users[volume_id], self._locks[volume_id]

    def check(self, volume_id: str) -> None:
        """Raise when this host may no longer change the volume under the lock it took
        (only cluster locks can lapse)."""

    def lapsed(self, volume_id: str) -> StorageUnavailable | None:
        """Why this host may no longer change the volume (:meth:`check`), or None. A step
        failing then most likely failed of it: a stall past the lease, and another host's
        recovery undoing what the stalled step wrote; whoever holds the lock after it (this
        host too, once back) finishes the operation, so nothing more is undone here."""
        try:
            self.check(volume_id)
        except StorageUnavailable as exc:
            return exc
        return None

    def busy(self, volume_id: str) -> bool:
        """Whether an operation of this daemon holds or waits for the volume's lock."""
        return volume_id in self._users

    @asynccontextmanager
    async def _file_lock(self, volume_id: str) -> AsyncIterator[None]:
        fd = os.open(self.directory / f"{volume_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:  # free (the usual case): taken at once, no thread
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process holds it: wait in a worker thread,
                # blocked in the kernel, never polling
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

