"""The libvirt edge: one owner of the connection, events on the asyncio loop.

``libvirtaio`` is registered on the daemon's loop before the connection opens, so libvirt's
events (block jobs, domain lifecycle) arrive as loop callbacks, within milliseconds. Blocking
libvirt calls run in a bounded thread pool. A closed connection is reopened with back-off,
events are registered again and every listener is told, so that in-flight operations are
reconciled. Every callback catches and logs its own errors: an exception must never reach
libvirt's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirtaio

from hostvold.errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# virConnectDomainEventBlockJobStatus
JOB_COMPLETED, JOB_FAILED, JOB_CANCELED, JOB_READY = 0, 1, 2, 3
# not a libvirt status: the connection came back, events may have been missed, look again
RECONNECTED = -1
STATUS_NAMES = {JOB_COMPLETED: "completed", JOB_FAILED: "failed", JOB_CANCELED: "canceled",
                JOB_READY: "ready", RECONNECTED: "reconnected"}

_registered_loops: set[int] = set()


@dataclass(frozen=True)
class BlockJobEvent:
    domain_uuid: str
    disk: str  # the target, e.g. "sda"
    job_type: int
    status: int
    at: float  # time.monotonic() when the event reached the loop

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))


class Hypervisor:
    def __init__(self, uri: str, workers: int = 4, keepalive: int = 5) -> None:
        self.uri = uri
        self.keepalive = keepalive
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        self.conn: libvirt.virConnect | None = None
        self._queues: dict[tuple[str, str], list[asyncio.Queue[BlockJobEvent]]] = {}
        self._callbacks: list[int] = []
        self.on_domain_stopped: list[Callable[[str], None]] = []
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking libvirt call in the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        if id(loop) not in _registered_loops:
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            _registered_loops.add(id(loop))
        try:
            conn = await self.call(libvirt.open, self.uri)
        except libvirt.libvirtError as exc:
            raise StorageUnavailable(f"cannot connect to libvirt at {self.uri}: {exc}") from None
        if self.keepalive:
            try:
                conn.setKeepAlive(self.keepalive, 3)
            except libvirt.libvirtError as exc:  # local drivers have no keepalive
                log.info("no libvirt keepalive on %s: %s", self.uri, exc.get_error_message())
        conn.registerCloseCallback(self._closed, None)
        self._callbacks = [
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                                        self._block_job, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._lifecycle, None),
        ]
        self.conn = conn
        log.info("connected to libvirt at %s", self.uri)

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                for callback in self._callbacks:
                    conn.domainEventDeregisterAny(callback)
                conn.unregisterCloseCallback()
                conn.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def require(self) -> libvirt.virConnect:
        if self.conn is None:
            raise StorageUnavailable(f"libvirt at {self.uri} is not connected")
        return self.conn

    # ---- events -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def block_job_events(self, domain_uuid: str, disk: str) -> Iterator[
            asyncio.Queue[BlockJobEvent]]:
        """Collect the block-job events of one disk; enter before starting the job."""
        queue: asyncio.Queue[BlockJobEvent] = asyncio.Queue()
        key = (domain_uuid, disk)
        self._queues.setdefault(key, []).append(queue)
        try:
            yield queue
        finally:
            queues = self._queues.get(key, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._queues.pop(key, None)

    def _block_job(self, conn: Any, dom: Any, disk: str, job_type: int, status: int,
                   opaque: Any) -> None:
        try:
            event = BlockJobEvent(dom.UUIDString(), disk, job_type, status, time.monotonic())
            log.info("block job event: domain %s disk %s type %d %s", dom.name(), disk,
                     job_type, event.status_name, extra={"DOMAIN": dom.name()})
            for queue in self._queues.get((event.domain_uuid, disk), []):
                queue.put_nowait(event)
        except Exception:
            log.exception("block job event handler failed")

    def _lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        try:
            if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
                name = dom.name()
                for listener in self.on_domain_stopped:
                    listener(name)
        except Exception:
            log.exception("lifecycle event handler failed")

    def _closed(self, conn: Any, reason: int, opaque: Any) -> None:
        try:
            log.warning("libvirt connection closed (reason %d); reconnecting", reason)
            self.conn = None
            if not self._closing and self._reconnecting is None:
                self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())
        except Exception:
            log.exception("close callback failed")

    async def _reconnect(self) -> None:
        delay = 0.2
        try:
            while not self._closing:
                try:
                    await self.connect()
                    break
                except StorageUnavailable as exc:
                    log.warning("%s; retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)  # back-off between attempts
                    delay = min(delay * 2, 10.0)
            for (domain_uuid, disk), queues in self._queues.items():
                for queue in queues:  # whoever waits for a job looks at it again
                    queue.put_nowait(BlockJobEvent(domain_uuid, disk, 0, RECONNECTED,
                                                   time.monotonic()))
            for listener in self.on_reconnect:
                try:
                    await listener()
                except Exception:
                    log.exception("reconcile after reconnect failed")
        finally:
            self._reconnecting = None

    # ---- domains ------------------------------------------------------------------------------

    async def running_domains(self) -> list[libvirt.virDomain]:
        conn = self.require()
        domains: list[libvirt.virDomain] = await self.call(
            conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return domains

    async def lookup(self, name: str) -> libvirt.virDomain:
        conn = self.require()
        try:
            domain: libvirt.virDomain = await self.call(conn.lookupByName, name)
        except libvirt.libvirtError as exc:
            from hostvold.errors import NotFound
            raise NotFound(f"domain {name!r} does not exist: {exc.get_error_message()}") \
                from None
        return domain
