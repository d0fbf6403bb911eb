"""hostvolctl's connection to hostvold: the bus, calls, job watching, and the one mapping
of failures (D-Bus errors, an unreachable bus, a daemon that left) to a sentence and an
exit code (:class:`CliError`, caught in :func:`hostvold.client.main.main`).

The client knows the daemon by its bus name and object paths only; it imports nothing of
the server.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostvold.client.output import draw_progress, plain, plain_properties

# the names callers import from here, now defined where a reading command finds them light
from hostvold.client.wire import BUS_NAME as BUS_NAME
from hostvold.client.wire import EXIT_CODES as EXIT_CODES
from hostvold.client.wire import EXIT_CONFIG as EXIT_CONFIG
from hostvold.client.wire import EXIT_DENIED as EXIT_DENIED
from hostvold.client.wire import EXIT_FAILED as EXIT_FAILED
from hostvold.client.wire import EXIT_NOT_RUNNING as EXIT_NOT_RUNNING
from hostvold.client.wire import EXIT_USAGE as EXIT_USAGE
from hostvold.client.wire import PREFIX as PREFIX
from hostvold.client.wire import ROOT_PATH as ROOT_PATH
from hostvold.client.wire import CliError as CliError
from hostvold.client.wire import bus_error as _error
from hostvold.client.wire import object_id as object_id
from hostvold.client.wire import object_path as object_path
from hostvold.client.wire import os_error as os_error
from hostvold.client.wire import resolve as resolve
from hostvold.core.collector import collector_paused


def interaction() -> MessageFlag:
    """At a terminal, a call may wait for polkit to ask for a password (an agent such as
    pkttyagent prompts); from a script it never does, and is refused at once instead."""
    return MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if sys.stdin.isatty() \
        else MessageFlag.NONE


def with_fd_indexes(body: list[Any]) -> tuple[list[Any], list[int]]:
    """Options given as ``Variant("h", fd)`` travel in the message's descriptor list; the
    body carries their indexes there."""
    if not body or not isinstance(body[0], dict):
        return body, []
    fds: list[int] = []
    options = {}
    for key, value in body[0].items():
        if isinstance(value, Variant) and value.signature == "h":
            fds.append(value.value)
            value = Variant("h", len(fds) - 1)
        options[key] = value
    return [options, *body[1:]], fds


class Client:
    def __init__(self, bus: MessageBus, address: str) -> None:
        self.bus = bus
        self.address = address
        self.handlers: list[Callable[[Message], None]] = []
        bus.add_message_handler(self._dispatch)

    @classmethod
    async def connect(cls, address: str) -> Client:
        try:
            if address == "system":
                bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
            else:
                bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                                 negotiate_unix_fd=True)
            return cls(await bus.connect(), address)
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot reach the D-Bus {address} bus ({exc}); is hostvold "
                           "running?", EXIT_NOT_RUNNING) from None

    def _dispatch(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL:
            for handler in self.handlers:
                handler(message)

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, destination: str = BUS_NAME) -> list[Any]:
        reply, fds = await self.call_with_fds(path, interface, member, signature, body,
                                              destination)
        for fd in fds:  # descriptors nobody asked for
            os.close(fd)
        return reply

    async def call_with_fds(self, path: str, interface: str, member: str,
                            signature: str = "", body: list[Any] | None = None,
                            destination: str = BUS_NAME) -> tuple[list[Any], list[int]]:
        """The reply's body and the descriptors it came with (the caller's to close): a
        value of type 'h' in the body is an index into that list."""
        body, fds = with_fd_indexes(body or [])
        reply = await self.bus.call(Message(destination=destination, path=path,
                                            interface=interface, member=member,
                                            signature=signature, body=body or [],
                                            unix_fds=fds, flags=interaction()))
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            raise _error(reply.error_name or "", str(reply.body[0]) if reply.body else "",
                         self.address)
        return list(reply.body), list(reply.unix_fds)

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        with collector_paused():  # the answer is decoded into many acyclic objects
            (managed,) = await self.call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                                         "GetManagedObjects")
        return {str(path): {iface: plain_properties(props) for iface, props in ifaces.items()}
                for path, ifaces in managed.items()}

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = await self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                                   [interface])
        return plain_properties(props)

    async def watch_jobs(self) -> None:
        """Subscribe to job signals, and to the daemon leaving the bus, before any call,
        so none can be missed."""
        for rule in (f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}/jobs'",
                     "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                     f"arg0='{BUS_NAME}'"):
            await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                            [rule], destination="org.freedesktop.DBus")

    async def run_job(self, path: str, member: str, options: dict[str, Variant],
                      interface: str, show_progress: bool,
                      leading: tuple[str, list[Any]] = ("", [])) -> dict[str, Any]:
        """Call a job-returning method and wait for the job's Completed signal.
        ``leading``: the signature and values of the arguments before the options (e.g.
        ``("ao", [paths])``)."""
        waiter = await self.job_waiter(show_progress)
        (job,) = await self.call(path, f"{PREFIX}{interface}", member,
                                 f"{leading[0]}a{{sv}}", [*leading[1], options])
        return await waiter.wait(str(job))

    async def job_waiter(self, show_progress: bool = False) -> JobWaiter:
        """Ready to wait for a job the next call starts: made before that call, so none of
        its signals can be missed."""
        await self.watch_jobs()
        return JobWaiter(self, show_progress)


class JobWaiter:
    """Collects the jobs' Completed signals (and the daemon leaving the bus) from the moment
    it is made; :meth:`wait` then waits for one job, however early it ended."""

    def __init__(self, client: Client, show_progress: bool) -> None:
        self.client = client
        self.show_progress = show_progress
        self.done: asyncio.Future[tuple[bool, str, str]] = \
            asyncio.get_running_loop().create_future()
        # the daemon may leave before wait() awaits it (a call of wait's own failed first):
        # its exception counts as seen, and asyncio prints no "never retrieved" on exit
        self.done.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        self.job_path: list[str] = []
        self.early: dict[str, tuple[bool, str, str]] = {}
        client.handlers.append(self._on_signal)

    def _on_signal(self, message: Message) -> None:
        done, job_path = self.done, self.job_path
        if (message.member == "NameOwnerChanged" and message.body[0] == BUS_NAME
                and not message.body[2] and not done.done()):
            done.set_exception(CliError(
                "hostvold stopped while the job ran; it finishes or undoes the operation "
                "when it starts again", EXIT_NOT_RUNNING))
        elif message.member == "Completed":
            result = (bool(message.body[0]), str(message.body[1]), str(message.body[2]))
            if job_path and message.path == job_path[0]:
                if not done.done():
                    done.set_result(result)
            else:
                self.early[str(message.path)] = result
        elif (self.show_progress and message.member == "PropertiesChanged" and job_path
              and message.path == job_path[0]):
            changed = plain(message.body[1])
            if "Progress" in changed:
                draw_progress(float(changed["Progress"]), float(changed.get("Rate", 0)))

    async def wait(self, job: str) -> dict[str, Any]:
        """The job's properties once it completed; its failure as a :class:`CliError`."""
        client, done = self.client, self.done
        self.job_path.append(job)
        if job in self.early:
            done.set_result(self.early[job])
        else:
            props = await client.properties(job, f"{PREFIX}Job")
            if props["State"] != "running" and not done.done():
                error = props["Error"]
                done.set_result((props["State"] == "completed", error[0], error[1]))
        success, error_name, message = await done
        if self.show_progress:
            sys.stderr.write("\n")
        props = await client.properties(job, f"{PREFIX}Job")
        if not success:
            raise _error(error_name, message, client.address)
        return {"job": job, **props}
