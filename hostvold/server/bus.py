"""The D-Bus edge: connection, bus name, caller identity, error names, object paths, and
the ObjectManager's signals.

dbus-fast does not tell a method who called it. A message handler that runs before
dispatch (:func:`remember_call`) records the sender of each method call in a context
variable; the task that runs the method inherits it (:mod:`hostvold.server.authority`
decides from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import time
from contextvars import ContextVar
from typing import Any

from dbus_fast import (
    BusType,
    DBusError,
    Message,
    MessageType,
    NameFlag,
    RequestNameReply,
)
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from hostvold.core.errors import Failed, HostvoldError, StorageUnavailable
from hostvold.server.leanbus import LeanMessageBus

log = logging.getLogger(__name__)

BUS_NAME = "org.hostvold1"
ROOT_PATH = "/org/hostvold1"
ERROR_PREFIX = "org.hostvold1.Error."
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"

caller: ContextVar[str | None] = ContextVar("hostvold_caller", default=None)
# how long the file descriptors of a call wait for their method to claim them; any call
# that does not reach a method of ours (an unknown object, a property) has them closed then
UNCLAIMED_FD_SECONDS = 2.0
SENDMSG_WAIT = 5.0  # seconds a message carrying descriptors waits for a full bus socket


class ReceivedFds:
    """The file descriptors that came with one method call. The daemon owns them: the
    method closes them when it returns (a job that needs one keeps a ``dup``)."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = list(fds)
        self.claimed = False

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_unclaimed(self) -> None:
        if not self.claimed:
            self.close()


received_fds: ContextVar[ReceivedFds | None] = ContextVar("hostvold_fds", default=None)


class ManagedBus(LeanMessageBus):
    """The bus whose ObjectManager signals come from the ObjectManager.

    dbus-fast's ``export``/``unexport`` send InterfacesAdded/InterfacesRemoved from the
    exported object's own path. The D-Bus specification has them sent by the ObjectManager,
    from its path (ours: the root), with the object's path as the first argument; that is
    what GDBus's and sd-bus's clients subscribe to. These two methods replace dbus-fast's
    (export and unexport call them): one signal per export or unexport, from the root, for
    the objects below it; none for the root itself, which is not one of the objects it
    manages (GetManagedObjects leaves it out too)."""

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected or not path.startswith(f"{ROOT_PATH}/"):
            return

        def send(interface: ServiceInterface, values: Any, _: Any,
                 error: Exception | None) -> None:
            if error is not None:  # as dbus-fast does: the signal goes without that property
                log.error("InterfacesAdded of %s on %s lacks a property: %s",
                          interface.name, path, error)
            self.send(Message.new_signal(ROOT_PATH, OBJECT_MANAGER, "InterfacesAdded",
                                         "oa{sa{sv}}", [path, {interface.name: values}]))

        ServiceInterface._get_all_property_values(interface, send)

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected or not path.startswith(f"{ROOT_PATH}/"):
            return
        self.send(Message.new_signal(ROOT_PATH, OBJECT_MANAGER, "InterfacesRemoved", "oas",
                                     [path, removed_interfaces]))


def object_path(kind: str, object_id: str) -> str:
    """``/org/hostvold1/<kind>/<id>`` with the id made a valid path element ('-' -> '_')."""
    return f"{ROOT_PATH}/{kind}/{object_id.replace('-', '_')}"


def parse_path(path: str) -> tuple[str, str] | None:
    """The kind and id of ``/org/hostvold1/<kind>/<id>`` ('_' -> '-'); None for any other
    path. The one place an object path is read back."""
    parts = path.split("/")
    if len(parts) != 5 or parts[:3] != ["", "org", "hostvold1"] or not parts[4]:
        return None
    return parts[3], parts[4].replace("_", "-")


def id_from_path(path: str, kind: str) -> str:
    parsed = parse_path(path)
    if parsed is None or parsed[0] != kind:
        raise ValueError(f"{path} is not a {kind} object path")
    return parsed[1]


def dbus_error(exc: HostvoldError) -> DBusError:
    return DBusError(ERROR_PREFIX + exc.name, exc.message)


async def connect(address: str) -> MessageBus:
    """Connect to ``system``, ``session`` or an explicit address."""
    if address == "system":
        bus = ManagedBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    elif address == "session":
        bus = ManagedBus(bus_type=BusType.SESSION, negotiate_unix_fd=True)
    else:
        bus = ManagedBus(bus_address=address, bus_type=BusType.SYSTEM,
                             negotiate_unix_fd=True)
    try:
        connected: MessageBus = await bus.connect()
    except (OSError, ValueError) as exc:
        raise StorageUnavailable(f"cannot connect to the D-Bus bus {address!r}: {exc}") \
            from None
    wait_when_full(connected)
    return connected


class _SendsThatWait:
    """The bus socket as dbus-fast's writer sees it, but a ``send`` the kernel cannot take
    now returns 0 (nothing sent) instead of raising BlockingIOError.

    dbus-fast (5.2) writes at once when its queue is empty and takes any error of that
    write, BlockingIOError too, for a lost connection: it closes the bus. The socket is full
    whenever the bus reads slower than we write, e.g. the InterfacesAdded of 10,000 volumes
    at start while dbus-daemon is short of CPU, and the daemon died of it (P6 at load 6 on
    two cores). With 0 its writer keeps the rest and waits until the socket is writable.
    ``sendmsg`` (a message carrying file descriptors, the reply of ExportChanges) cannot do
    the same: the writer drops the descriptors after that one call, whatever it returned,
    so a full socket is waited for right there, up to ``SENDMSG_WAIT`` seconds (the 10,000
    calls of bench/fuzz_api.py lost the bus that way twice)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers: Any, ancdata: Any = (), *rest: Any) -> int:
        deadline = time.monotonic() + SENDMSG_WAIT
        while True:
            try:
                return self._sock.sendmsg(buffers, ancdata, *rest)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                select.select([], [self._sock], [], left)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def wait_when_full(bus: MessageBus) -> None:
    """Make ``bus``'s writer wait for a full socket instead of dropping the connection."""
    writer = getattr(bus, "_writer", None)
    if writer is not None and not isinstance(writer.sock, _SendsThatWait):
        writer.sock = _SendsThatWait(writer.sock)


async def lost(bus: MessageBus) -> str:
    """Wait until ``bus`` is disconnected (dbus-daemon restarted, the socket broken);
    why it was."""
    try:
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        return "the bus closed it"
    except Exception as exc:
        return str(exc) or type(exc).__name__


async def own_name(bus: MessageBus) -> None:
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        raise Failed(f"{BUS_NAME} is already owned on this bus: is another hostvold running?")


def remember_call(message: Message) -> bool | None:
    """A message handler run before dispatch: a method call's sender and file descriptors
    go to the context variables the method's task inherits (:data:`caller`,
    :data:`received_fds`); fds nobody asked for (on a signal or reply) are closed."""
    if message.message_type == MessageType.METHOD_CALL:
        caller.set(message.sender)
        holder = ReceivedFds(message.unix_fds) if message.unix_fds else None
        received_fds.set(holder)
        if holder is not None:
            asyncio.get_running_loop().call_later(UNCLAIMED_FD_SECONDS,
                                                  holder.close_unclaimed)
    elif message.unix_fds:
        ReceivedFds(message.unix_fds).close()
    return None  # let dispatch go on
