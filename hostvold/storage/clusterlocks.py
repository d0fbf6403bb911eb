"""Per-volume cluster locks over tooz, and what a caller hears when another host holds one.

A volume's lock is tooz's (``hostvold-volume-<id>``), held for a whole operation. Beside it
the holder writes who it is on its session's lease (``/hostvold/holders/<lock>``), so a
caller on another host is told at once which host holds the volume and when its lease ends
(``Busy``), never left waiting behind a long operation or a host that just died. Only a
holder that said its hold is brief (a look at the volume after an event, not an operation)
is waited for, a moment. Every step of an operation checks that its lock is still of the
current session and that the lease is fresh (:meth:`ClusterLocks.check`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from hostvold.core.aio import uninterrupted
from hostvold.core.errors import Busy
from hostvold.storage.coordination import (
    BACKEND_FAILURES,
    Coordination,
    CoordinationUnavailable,
    lease_ttl,
    now_text,
    session_lease,
    text,
)
from hostvold.storage.locks import LocalLocks

HOLDERS = "/hostvold/holders/"  # who holds a lock: one key per held lock, on the session
LOCKS = "/tooz/locks"  # tooz's own keys
BRIEF_WAIT = 2.0  # seconds a call waits for another host's brief look at a volume


class ClusterLocks(LocalLocks):
    """Per-volume locks: this daemon's own (asyncio + flock), then the cluster's.
    ``on_released`` hears of every volume whose lock this host let go."""

    def __init__(self, local_directory: Any, coordination: Coordination) -> None:
        super().__init__(local_directory)
        self.coordination = coordination
        self.on_released: list[Callable[[str], None]] = []
        self._held: dict[str, int] = {}  # volume id: the session epoch its lock is of

    @contextlib.asynccontextmanager
    async def volume(self, volume_id: str, wait: bool = True,
                     brief: bool = False) -> AsyncIterator[None]:
        try:
            async with super().volume(volume_id), \
                    self._cluster_lock(f"hostvold-volume-{volume_id}", wait,
                                      brief) as epoch:
                self._held[volume_id] = epoch
                try:
                    yield
                finally:
                    del self._held[volume_id]
        finally:
            for released in self.on_released:
                released(volume_id)

    def check(self, volume_id: str) -> None:
        epoch = self._held.get(volume_id)
        if epoch is None:
            return
        if epoch != self.coordination.epoch:
            raise CoordinationUnavailable(
                f"host {self.coordination.host_id} lost its lock on volume {volume_id} with "
                "its expired session; the operation is left to the host that holds it now")
        self.coordination.require()

    @contextlib.asynccontextmanager
    async def _cluster_lock(self, name: str, wait: bool, brief: bool) -> AsyncIterator[int]:
        """Hold the cluster-wide lock ``name``; yields the session epoch it was taken in.
        Held by another host: ``wait`` for its release (an etcd watch on the lock's key,
        in a worker thread), or raise ``Busy`` at once naming the holder; only a holder
        that said its hold is ``brief`` (a look at the volume, not an operation) is waited
        for, up to ``BRIEF_WAIT`` seconds."""
        coordination = self.coordination
        lock = coordination.coordinator.get_lock(name.encode())
        acquired = False
        give_up = time.monotonic() + BRIEF_WAIT
        try:
            while True:
                coordination.require()
                epoch = coordination.epoch
                acquired = await uninterrupted(coordination.call(self._take, lock, name, brief))
                if acquired:
                    break
                if not wait:
                    held_by, briefly = await coordination.call(self._held_by, name)
                    if not briefly or time.monotonic() >= give_up:
                        raise Busy(held_by)
                await coordination.call(self._wait_release, name)
            yield epoch
        finally:
            if acquired:
                with contextlib.suppress(CoordinationUnavailable):
                    await uninterrupted(coordination.call(self._give_back, lock, name))

    def _take(self, lock: Any, name: str, brief: bool) -> bool:
        if not lock.acquire(blocking=False):
            return False
        coordinator = self.coordination.coordinator
        holder = f"{self.coordination.host_id} {now_text()} {'brief' if brief else 'operation'}"
        with contextlib.suppress(*BACKEND_FAILURES):  # only a Busy message would lack it
            coordinator.client.put(HOLDERS + name, holder, lease=session_lease(coordinator))
        return True

    def _give_back(self, lock: Any, name: str) -> None:
        """Release; a release that failed (etcd away) must not leave tooz renewing the lock
        for ever: it is dropped from tooz's renewals and its lease revoked, or let run out."""
        coordinator = self.coordination.coordinator
        with contextlib.suppress(*BACKEND_FAILURES):  # bound to the session: it goes anyway
            coordinator.client.delete(HOLDERS + name)
        released = False
        try:
            released = bool(lock.release())
        finally:
            if not released:
                coordinator._acquired_locks.discard(lock)
                with contextlib.suppress(*BACKEND_FAILURES):
                    lock._lease.revoke()

    def _wait_release(self, name: str) -> None:
        """Until the lock's key goes (or a few seconds pass: the caller tries again)."""
        with contextlib.suppress(*BACKEND_FAILURES):
            self.coordination.coordinator.client.watch_once(f"{LOCKS}{name}", timeout=2.0)

    def _held_by(self, name: str) -> tuple[str, bool]:
        """Who holds lock ``name``, until when its lease runs without a renewal, and
        whether the holder said its hold is brief."""
        client = self.coordination.coordinator.client
        volume = name.removeprefix("hostvold-volume-")
        found = client.get(f"{LOCKS}{name}", metadata=True)
        ttl = lease_ttl(client, int(found[0][1].get("lease", 0))) if found else 0
        holder = client.get(HOLDERS + name)
        if not found:
            return f"volume {volume}'s lock was just let go; try again", True
        if not holder:  # just taken (its holder is being written), or its holder left
            return (f"volume {volume} is locked by a host that has left the group; its lock "
                    f"ends in {max(ttl, 0)} s, then any host may take its operation over",
                    True)
        host, since, kind = [*text(holder[0]).split(" "), "", ""][:3]
        if host == self.coordination.host_id:
            return (f"volume {volume} is locked by this host's previous run (since {since}); "
                    f"its lock ends in {max(ttl, 0)} s, then this host finishes its "
                    "operation", False)
        return (f"volume {volume} is being changed by host {host} (since {since}; its lease "
                f"holds {max(ttl, 0)} s more unless it renews); try again once it is done",
                kind == "brief")
