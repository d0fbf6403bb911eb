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

from hostvold.core.aio import uninterrupted
from hostvold.core.backoff import backoff
from hostvold.core.errors import DomainGone, HypervisorError, HypervisorUnavailable, InvalidState

log = logging.getLogger(__name__)

T = TypeVar("T")

# libvirt's own handler prints every error to stderr; ours are classified and raised instead
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# errors that say nothing about the domain, only that libvirt could not be asked
_UNREACHABLE = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT,
                libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_AUTH_FAILED,
                libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE}


def classify(exc: libvirt.libvirtError) -> HypervisorError:
    """A libvirt error as a named hostvold error. Only VIR_ERR_NO_DOMAIN means the domain
    is gone; a lost connection or a timeout means nothing is known."""
    code = int(exc.get_error_code() or 0)
    message = exc.get_error_message() or str(exc)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainGone(f"the domain does not exist (libvirt: {message})", code)
    if code in _UNREACHABLE or exc.get_error_domain() in (libvirt.VIR_FROM_RPC,
                                                          libvirt.VIR_FROM_REMOTE):
        return HypervisorUnavailable(f"libvirt did not answer ({message}); the operation is "
                                     "kept and resumed when libvirt is back", code)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        error = HypervisorError(f"libvirt refused it in the domain's present state: "
                                f"{message}", code)
        error.name = InvalidState.name
        return error
    return HypervisorError(f"libvirt failed: {message}", code)

# virConnectDomainEventBlockJobStatus
JOB_COMPLETED, JOB_FAILED, JOB_CANCELED, JOB_READY = 0, 1, 2, 3
# not a libvirt status: the connection came back, events may have been missed, look again
RECONNECTED = -1
# not a libvirt status: the domain stopped, its block jobs with it
DOMAIN_STOPPED = -2
# not a libvirt lifecycle event: a device left the domain (VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED)
DEVICE_REMOVED = -1
STATUS_NAMES = {JOB_COMPLETED: "completed", JOB_FAILED: "failed", JOB_CANCELED: "canceled",
                JOB_READY: "ready", RECONNECTED: "reconnected",
                DOMAIN_STOPPED: "ended with its domain"}

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
        # (domain name, libvirt lifecycle event or DEVICE_REMOVED, detail)
        self.on_lifecycle: list[Callable[[str, int, int], None]] = []
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking libvirt call in the pool; libvirt errors come back classified.

        A call that has started is never abandoned: cancelled while it runs, we still wait
        for its outcome (so the caller can record it), and the cancellation is delivered
        at the caller's next await. A thread left running unobserved could switch a domain
        to an overlay that recovery has already decided to remove.
        """
        future = asyncio.get_running_loop().run_in_executor(self.executor, function, *args)
        try:
            return await uninterrupted(future)
        except libvirt.libvirtError as exc:
            raise classify(exc) from None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        if id(loop) not in _registered_loops:
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            _registered_loops.add(id(loop))
        try:
            conn = await self.call(libvirt.open, self.uri)
        except HypervisorError as exc:
            raise HypervisorUnavailable(f"cannot connect to libvirt at {self.uri}: "
                                        f"{exc.message}", exc.code) from None
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
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                                        self._device_removed, None),
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
            raise HypervisorUnavailable(f"libvirt at {self.uri} is not connected; attached "
                                        "volumes cannot be checked or changed until it is back")
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
            name = dom.name()
            log.info("domain %s: %s", name, _lifecycle_name(event, detail),
                     extra={"DOMAIN": name})
            if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:  # whoever waits for a job: it ended
                uuid = dom.UUIDString()
                for (domain_uuid, disk), queues in self._queues.items():
                    for queue in queues if domain_uuid == uuid else []:
                        queue.put_nowait(BlockJobEvent(uuid, disk, 0, DOMAIN_STOPPED,
                                                       time.monotonic()))
            for listener in self.on_lifecycle:
                listener(name, event, detail)
        except Exception:
            log.exception("lifecycle event handler failed")

    def _device_removed(self, conn: Any, dom: Any, alias: str, opaque: Any) -> None:
        try:
            for listener in self.on_lifecycle:  # a disk unplugged by another tool
                listener(dom.name(), DEVICE_REMOVED, 0)
        except Exception:
            log.exception("device-removed event handler failed")

    def _closed(self, conn: Any, reason: int, opaque: Any) -> None:
        try:
            log.warning("libvirt connection closed (reason %d); reconnecting", reason)
            self.conn = None
            self.reconnect()
        except Exception:
            log.exception("close callback failed")

    def reconnect(self) -> None:
        """Connect again in the background, with back-off; listeners hear when it is done."""
        if not self._closing and self._reconnecting is None:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        pauses = backoff(0.2, 10.0)
        try:
            while not self._closing:
                try:
                    await self.connect()
                    break
                except HypervisorUnavailable as exc:
                    pause = next(pauses)
                    log.warning("%s; retrying in %.1f s", exc, pause)
                    await asyncio.sleep(pause)
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

    async def domains_by_state(self) -> tuple[list[libvirt.virDomain],
                                              list[libvirt.virDomain]]:
        """(running domains, defined domains that are shut off): two calls in all."""
        conn = self.require()
        running: list[libvirt.virDomain] = await self.call(
            conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        stopped: list[libvirt.virDomain] = await self.call(
            conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)
        return running, stopped

    async def lookup(self, name: str) -> libvirt.virDomain:
        """The domain called ``name``; DomainGone only when libvirt says it does not exist."""
        conn = self.require()
        try:
            domain: libvirt.virDomain = await self.call(conn.lookupByName, name)
        except DomainGone:
            raise DomainGone(f"domain {name!r} does not exist") from None
        return domain

    async def define(self, xml: str) -> None:
        await self.call(self.require().defineXML, xml)


def _lifecycle_name(event: int, detail: int) -> str:
    names = {libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
             libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
             libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
             libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
             libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
             libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
             libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
             libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pm-suspended",
             libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed"}
    stopped = {libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
               libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
               libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
               libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
               libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
               libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
               libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from-snapshot"}
    name = names.get(event, str(event))
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        return f"{name} ({stopped.get(detail, detail)})"
    return name
