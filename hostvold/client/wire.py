"""What every hostvolctl call needs and nothing more: the names, the exit codes, the one
mapping of D-Bus failures to a sentence (:class:`CliError`), and :class:`WireClient`, a
blocking connection for the commands that only read (status, volumes, show, ...).

A reading command makes one connection, one Hello and one or two calls: done with a plain
socket, without the event loop and without dbus_fast's bus machinery, whose import alone
(asyncio, the service and introspection layers) costs several times what the call does.
Only dbus_fast's wire format modules are loaded (:func:`wire_only`). Anything that waits
for signals or jobs uses :class:`~hostvold.client.connection.Client` instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED, EXIT_CONFIG = 1, 2, 3, 4, 78
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a reader that went away
EXIT_CODES = """Exit codes: 0 success; 1 the operation failed (the message names the error); 2 usage
error; 3 hostvold is not running or the bus cannot be reached; 4 permission denied;
78 invalid configuration file (check-config)."""

BUS_NAME = "org.hostvold1"
ROOT_PATH = "/org/hostvold1"
PREFIX = "org.hostvold1."


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ---- object paths ----------------------------------------------------------------------

def object_path(kind: str, object_id: str) -> str:
    """``/org/hostvold1/<kind>/<id>``, the id made a valid path element ('-' -> '_')."""
    return f"{ROOT_PATH}/{kind}/{object_id.replace('-', '_')}"


def object_id(path: str) -> str:
    """The id an object path names (its last element, '_' -> '-')."""
    return path.rsplit("/", 1)[1].replace("_", "-")


def resolve(kind: str, value: str) -> str:
    """A volume/snapshot/job/group given as an id or an object path, as an object path
    (a value that makes no object path is refused here, before any call)."""
    from dbus_fast.validators import is_object_path_valid

    path = value if value.startswith("/") else object_path(kind, value)
    if not is_object_path_valid(path):
        raise CliError(f"InvalidArgument: {value!r} is not a {kind.removesuffix('s')} id "
                       "or object path")
    return path


# ---- failures --------------------------------------------------------------------------

def bus_error(name: str, text: str, bus: str) -> CliError:
    """A D-Bus error reply as the sentence and exit code hostvolctl reports."""
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return CliError(f"hostvold is not running (nobody owns {BUS_NAME} on the {bus} bus); "
                        "start it with `systemctl start hostvold`", EXIT_NOT_RUNNING)
    if name.startswith("org.freedesktop.DBus.Error.Spawn.") or name in (
            "org.freedesktop.DBus.Error.NoServer", "org.freedesktop.DBus.Error.TimedOut"):
        return CliError(f"hostvold is not running, and the {bus} bus could not start it "
                        f"({text or name}); start it with `systemctl start hostvold`",
                        EXIT_NOT_RUNNING)
    if name == f"{PREFIX}Error.NotAuthorized":  # the daemon says who may
        return CliError(f"permission denied: {text}", EXIT_DENIED)
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return CliError(f"permission denied: {text.split(';')[0]} (the bus refused the call: "
                        "changing volumes needs root, the hostvold admin group, or polkit's "
                        "authorization with authorization = polkit)", EXIT_DENIED)
    if name in ("org.freedesktop.DBus.Error.UnknownObject",
                "org.freedesktop.DBus.Error.UnknownInterface"):
        return CliError(f"NotFound: {text}")
    short = name.removeprefix(f"{PREFIX}Error.")
    return CliError(f"{short}: {text}")


def os_error(verb: str, path: str, exc: OSError) -> CliError:
    """A file the client itself could not open or create, for the caller: denied (exit 4)
    or failed (exit 1)."""
    code = EXIT_DENIED if exc.errno in (errno.EACCES, errno.EPERM) else EXIT_FAILED
    return CliError(f"cannot {verb} {path}: {exc.strerror}", code)


def unreachable(address: str, exc: BaseException) -> CliError:
    return CliError(f"cannot reach the D-Bus {address} bus ({exc}); is hostvold running?",
                    EXIT_NOT_RUNNING)


# ---- dbus_fast's wire format alone -----------------------------------------------------

@contextlib.contextmanager
def wire_only() -> Iterator[None]:
    """Within: ``dbus_fast``'s modules import without the package's ``__init__`` (which
    imports asyncio and the whole bus and service layers), so only the wire format ones
    (message, marshaller, unmarshaller, signature, validators) are loaded. Afterwards the
    package's placeholder is taken out again: a later ``import dbus_fast`` runs the real
    ``__init__``, which finds those modules loaded. Nothing changes when the package is
    already imported."""
    if "dbus_fast" in sys.modules:
        yield
        return
    import importlib
    import importlib.machinery
    import types

    spec = importlib.machinery.PathFinder.find_spec("dbus_fast")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dbus_fast is not installed")
    package = types.ModuleType("dbus_fast")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["dbus_fast"] = package
    try:
        # message first: the package's own order (signature, loaded first, would find
        # message's import of it half done)
        importlib.import_module("dbus_fast.message")
        importlib.import_module("dbus_fast._private.unmarshaller")
        yield
    finally:
        if sys.modules.get("dbus_fast") is package:
            del sys.modules["dbus_fast"]


def socket_path(address: str) -> str:
    """The Unix socket a D-Bus address names ('system': the system bus), as a string for
    socket.connect (an abstract one starts with NUL)."""
    if address == "system":
        address = (os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
                   or "unix:path=/var/run/dbus/system_bus_socket")
    for entry in address.split(";"):
        transport, _, rest = entry.partition(":")
        if transport != "unix":
            continue
        options = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv)
        if "path" in options:
            return _unescaped(options["path"])
        if "abstract" in options:
            return "\0" + _unescaped(options["abstract"])
    raise ValueError(f"no unix socket in the D-Bus address {address!r}")


def _unescaped(value: str) -> str:
    """An address value's %-escapes undone (urllib's import costs more than the call)."""
    if "%" not in value:
        return value
    from urllib.parse import unquote
    return unquote(value)


class WireClient:
    """A blocking connection for calls whose replies are all there is to wait for. Its
    methods are coroutines that never suspend, so the commands written for
    :class:`~hostvold.client.connection.Client` run on it unchanged (:func:`drive`)."""

    def __init__(self, address: str) -> None:
        self.address = address
        from dbus_fast._private.unmarshaller import Unmarshaller
        from dbus_fast.message import Message

        self.message = Message
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.connect(socket_path(address))
            self.stream = self.sock.makefile("rb")
            self._authenticate()
        except (OSError, ValueError, EOFError) as exc:
            raise unreachable(address, exc) from None
        self.unmarshaller = Unmarshaller(stream=self.stream,  # type: ignore[arg-type]
                                         negotiate_unix_fd=False)
        self.serial = 0
        self._call("/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "", [],
                   "org.freedesktop.DBus")

    def _authenticate(self) -> None:
        uid = str(os.getuid()).encode().hex()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        line = self.stream.readline()
        if not line.startswith(b"OK "):
            raise ValueError(f"authentication refused: {line.decode(errors='replace').strip()}")
        self.sock.sendall(b"BEGIN\r\n")

    def _call(self, path: str, interface: str, member: str, signature: str,
              body: list[Any], destination: str) -> list[Any]:
        self.serial += 1
        message = self.message(destination=destination, path=path, interface=interface,
                               member=member, signature=signature, body=body,
                               serial=self.serial)
        try:
            self.sock.sendall(message._marshall(False))
            while True:
                reply = self.unmarshaller.unmarshall()
                if reply is None:
                    raise EOFError("the bus closed the connection")
                if reply.reply_serial == self.serial:
                    break  # else a signal (NameAcquired) or someone else's message
        except (OSError, EOFError) as exc:
            raise unreachable(self.address, exc) from None
        if reply.message_type.value == 3:  # ERROR
            raise bus_error(reply.error_name or "", str(reply.body[0]) if reply.body else "",
                            self.address)
        return list(reply.body)

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, destination: str = BUS_NAME) -> list[Any]:
        return self._call(path, interface, member, signature, body or [], destination)

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        from hostvold.client.output import plain_properties
        from hostvold.core.collector import collector_paused

        with collector_paused():  # the answer is decoded into many acyclic objects
            (managed,) = self._call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                                    "GetManagedObjects", "", [], BUS_NAME)
        return {str(path): {iface: plain_properties(props) for iface, props in ifaces.items()}
                for path, ifaces in managed.items()}

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        from hostvold.client.output import plain_properties

        (props,) = self._call(path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                              [interface], BUS_NAME)
        return plain_properties(props)

    def child_ids(self, kind: str) -> list[str]:
        """The ids of the objects under ``/org/hostvold1/<kind>``, from the introspection
        of that path alone (one short string, however many properties they have)."""
        (xml,) = self._call(f"{ROOT_PATH}/{kind}", "org.freedesktop.DBus.Introspectable",
                            "Introspect", "", [], BUS_NAME)
        ids = []
        for part in str(xml).split("<node name=\"")[1:]:
            name = part.split("\"", 1)[0]
            if name and not name.startswith("/"):  # not the introspected node itself
                ids.append(name.replace("_", "-"))
        return sorted(ids)

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def drive(coroutine: Any) -> Any:
    """Run a coroutine that never suspends (one awaiting only :class:`WireClient`) to its
    end, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("a command on the blocking connection waited for something")
