"""The cluster edge: tooz over etcd (SPEC section 8), for hosts that mount the same shares.

One coordinator per daemon, its member id the host id. Per-volume locks
(``hostvold-volume-<id>``) are held for whole operations; the host is a member of the group
``hostvold-hosts`` while its heartbeat renews its lease. Every tooz call blocks, so each
runs in a small thread pool of its own, never on the event loop.

Fencing: when the heartbeat cannot renew the lease for half its length, this host counts as
cut off (``healthy`` false, ``on_lost`` told): it starts no data-changing step and its
running jobs stop at their next recoverable step, well before the lease expires and another
host may take its locks and its operations over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from etcd3gw import exceptions as etcd_errors
from etcd3gw import watch as etcd_watch
from tooz import coordination

from hostvold.core.aio import uninterrupted
from hostvold.core.errors import StorageUnavailable
from hostvold.storage.locks import LocalLocks

log = logging.getLogger(__name__)

GROUP = b"hostvold-hosts"
CHANGES = "/hostvold/volumes/"  # one key per volume, bumped on every committed change
T = TypeVar("T")
# tooz wraps most failures in ToozError, but not all: its etcd driver lets the client's own
# errors (a refused or unreachable network: ConnectionFailedError) through from heartbeat
BACKEND_FAILURES = (coordination.ToozError, etcd_errors.Etcd3Exception, OSError)


class CoordinationUnavailable(StorageUnavailable):
    """The coordination backend cannot be reached, or this host lost its session: nothing
    that changes data may start. Reads go on."""

    name = "CoordinationUnavailable"


class Coordination:
    def __init__(self, url: str, host_id: str, lease_seconds: int) -> None:
        sep = "&" if "?" in url else "?"
        self.url = (f"{url}{sep}timeout={lease_seconds}&lock_timeout={lease_seconds}"
                    f"&membership_timeout={lease_seconds}")
        self.host_id = host_id
        self.lease_seconds = lease_seconds
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tooz")
        self.coordinator: Any = None
        self.healthy = False
        self.on_lost: list[Callable[[], None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_renewal = 0.0

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, function,
                                                                    *args)
        except BACKEND_FAILURES as exc:
            raise CoordinationUnavailable(
                f"the coordination backend at {self.url.split('?')[0]} failed "
                f"({str(exc) or type(exc).__name__}); changes are refused, reads go on") from None

    async def start(self) -> None:
        """Connect, join the hosts' group, and renew the lease from the event loop."""
        def connect() -> Any:
            coordinator = coordination.get_coordinator(self.url, self.host_id.encode())
            coordinator.start(start_heart=False)
            with contextlib.suppress(coordination.GroupAlreadyExist):
                coordinator.create_group(GROUP).get()
            with contextlib.suppress(coordination.MemberAlreadyExist):
                coordinator.join_group(GROUP).get()
            return coordinator

        self.coordinator = await self._call(connect)
        self.healthy, self._last_renewal = True, time.monotonic()
        self._heartbeat = asyncio.get_running_loop().create_task(self._renew())
        log.info("member %s of %s at %s (lease %d s)", self.host_id, GROUP.decode(),
                 self.url.split("?")[0], self.lease_seconds)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                await self._call(self._leave)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _leave(self) -> None:
        with contextlib.suppress(coordination.ToozError):
            self.coordinator.leave_group(GROUP).get()
        self.coordinator.stop()

    async def _renew(self) -> None:
        """Renew the lease a few times per lease. Half the lease after the last renewal was
        sent, a renewal that has not succeeded fences this host at that very moment: a try
        is cut short there, and after a failed try the next comes no later than that."""
        pause = max(self.lease_seconds / 6, 0.5)
        while True:
            fence_at = self._last_renewal + self.lease_seconds / 2
            if self.healthy:  # the lease's own clock: a renewal, not a poll
                await asyncio.sleep(max(min(pause, fence_at - time.monotonic()), 0))
            else:
                await asyncio.sleep(pause)
            sent = time.monotonic()  # etcd counts the lease from the request, not the reply
            wait = fence_at - sent if self.healthy else pause * 2
            try:
                await asyncio.wait_for(self._call(self.coordinator.heartbeat), max(wait, 0.05))
                if not self.healthy:
                    log.warning("coordination session of %s is back", self.host_id)
                self.healthy, self._last_renewal = True, sent
            except Exception as exc:  # whatever failed, the lease's clock decides
                overdue = time.monotonic() - self._last_renewal
                log.warning("lease renewal failed (%.1f s since the last): %s", overdue,
                            str(exc) or type(exc).__name__)
                if self.healthy and time.monotonic() >= fence_at:
                    self._fence()

    def _fence(self) -> None:
        self.healthy = False
        log.error("host %s lost its coordination session: no data-changing step starts, "
                  "running jobs stop at a recoverable step", self.host_id)
        for listener in self.on_lost:
            try:
                listener()
            except Exception:
                log.exception("fencing listener failed")

    def require(self) -> None:
        if not self.healthy:
            raise CoordinationUnavailable(f"host {self.host_id} has no coordination session; "
                                          "changes are refused until it is back")

    async def members(self) -> set[str]:
        """The hosts alive in the group now."""
        found = await self._call(lambda: self.coordinator.get_members(GROUP).get())
        return {member.decode() for member in found}

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """Hold the cluster-wide lock ``name``; waits in a worker thread, never on the loop."""
        lock = self.coordinator.get_lock(name.encode())
        acquired = False
        try:
            while not acquired:  # tries of a few seconds: a cancelled wait ends soon
                self.require()
                acquired = await uninterrupted(self._call(lock.acquire, 2.0))
            yield
        finally:
            if acquired:
                with contextlib.suppress(CoordinationUnavailable):
                    await uninterrupted(self._call(lock.release))


    async def announce(self, volume_id: str) -> None:
        """Tell every host that volume ``volume_id`` changed on the share."""
        if self.coordinator is not None and self.healthy:
            with contextlib.suppress(CoordinationUnavailable):
                await self._call(self.coordinator.client.put, f"{CHANGES}{volume_id}",
                                 f"{self.host_id} {time.time():.6f}")

    async def watch(self, changed: Callable[[str, str], None]) -> Callable[[], None]:
        """Call ``changed(volume_id, host)`` on the loop for every change any host
        announces (this host's own included); returns the function that stops watching."""
        def on_change(key: str, value: str) -> None:
            changed(key[len(CHANGES):], value.split(" ")[0])

        return await self._watch(CHANGES, on_change)

    async def watch_members(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed()`` on the loop whenever a host joins or leaves the group (a
        member's key goes with its lease: no polling of the member list)."""
        return await self._watch(f"tooz/groups/{GROUP.decode()}/", lambda _k, _v: changed())

    async def _watch(self, prefix: str, handler: Callable[[str, str], None]) -> Callable[[], None]:
        loop = asyncio.get_running_loop()

        def on_event(event: Any) -> None:  # in etcd3gw's thread
            key, value = (_text(event.get("kv", {}).get(field, b""))
                          for field in ("key", "value"))
            if key.startswith(prefix):
                loop.call_soon_threadsafe(handler, key, value)

        watcher = await self._call(lambda: etcd_watch.Watcher(
            self.coordinator.client, prefix, on_event, range_end=_prefix_end(prefix)))
        return watcher.stop


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _prefix_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class ClusterLocks(LocalLocks):
    """Per-volume locks: this daemon's own (asyncio + flock), then the cluster's.
    ``on_released`` hears of every volume whose lock this host let go."""

    def __init__(self, local_directory: Any, coordination: Coordination) -> None:
        super().__init__(local_directory)
        self.coordination = coordination
        self.on_released: list[Callable[[str], None]] = []

    @contextlib.asynccontextmanager
    async def volume(self, volume_id: str) -> AsyncIterator[None]:
        try:
            async with super().volume(volume_id), \
                    self.coordination.lock(f"hostvold-volume-{volume_id}"):
                yield
        finally:
            for released in self.on_released:
                released(volume_id)
