"""What every D-Bus method of hostvold shares: the D-Bus types of its arguments and
properties, the check of its options, the mapping of its errors and its file descriptors.

A method checks its options when the call arrives (each option's D-Bus type here, then the
request model of :mod:`hostvold.core.models`), so a bad call is answered with
``org.hostvold1.Error.InvalidArgument`` and no job is made. File descriptors that come with
a call are closed when the method returns; a job keeps a ``dup`` of its own.
"""

# no "from __future__ import annotations": dbus-fast reads the Annotated signatures
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from dbus_fast import DBusError, Variant
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import ServiceInterface

from hostvold.core.errors import Failed, HostvoldError, InvalidArgument
from hostvold.server.bus import ERROR_PREFIX, dbus_error, received_fds
from hostvold.storage.safefile import check_caller_fd
from hostvold.storage.shareio import named_storage_error

log = logging.getLogger(__name__)

ObjectPaths = Annotated[list[str], DBusSignature("ao")]
Strings = Annotated[list[str], DBusSignature("as")]
Pair = Annotated[tuple[str, str], DBusSignature("(ss)")]

T = TypeVar("T")

Accepted = dict[str, frozenset[str]]  # option name -> the D-Bus types it may come as
INT = frozenset("tuxiqn")  # D-Bus integer types a size may come as
STR = frozenset("s")
FD = frozenset("h")
NEW_VOLUME: Accepted = {"id": STR, "size": INT, "format": STR, "share": STR}
CREATE_OPTIONS: Accepted = {**NEW_VOLUME, "provisioning": STR}
IMPORT_OPTIONS: Accepted = {**NEW_VOLUME, "fd": FD, "source": STR, "source_format": STR}
EXPORT_OPTIONS: Accepted = {"fd": FD, "destination": STR, "format": STR}
NO_OPTIONS: Accepted = {}


def read_options(options: dict[str, Variant], accepted: Accepted) -> dict[str, Any]:
    """The options' values, each of a D-Bus type its option accepts; InvalidArgument naming
    the first unknown option or wrong type."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise InvalidArgument(f"unknown option {unknown[0]!r}; this method takes {takes}")
    values = {}
    for key, variant in options.items():
        if variant.signature not in accepted[key]:
            wanted = " or ".join(f"'{sig}'" for sig in sorted(accepted[key]))
            raise InvalidArgument(f"option {key}: expected D-Bus type {wanted}, got "
                                  f"'{variant.signature}'")
        values[key] = variant.value
    return values


def named_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map hostvold errors to named D-Bus errors; close the call's file descriptors."""
    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        fds = received_fds.get()
        if fds is not None:
            fds.claimed = True
        try:
            return await method(*args, **kwargs)
        except HostvoldError as exc:
            raise dbus_error(exc) from None
        except DBusError:
            raise
        except OSError as exc:
            named = named_storage_error(exc)
            if named is None:
                log.exception("%s failed unexpectedly", method.__name__)
                named = Failed(f"internal error: {type(exc).__name__}: {exc.strerror}")
            raise dbus_error(named) from None
        except Exception as exc:  # a bug: the caller still gets a named error
            log.exception("%s failed unexpectedly", method.__name__)
            raise DBusError(f"{ERROR_PREFIX}Failed",
                            f"internal error: {type(exc).__name__}") from None
        finally:
            if fds is not None:
                fds.close()
    return wrapper


def refuse_smaller(size: int | None, source_size: int | None, source: str) -> None:
    """A new volume's ``size`` option below its source's size is refused at the call (the
    copy would refuse it later, in a failed job). None: not given, or not known now."""
    if size is not None and source_size is not None and size < source_size:
        raise InvalidArgument(f"option size: {size} is smaller than the {source_size} bytes "
                              f"of {source}")


def caller_fd(value: object, write: bool) -> int:
    """The descriptor option ``fd`` names, checked to be one that came with this call.

    dbus-fast replaces an ``h`` index by the received descriptor only when the message
    carries descriptors; otherwise the value is the bare index, which must never be taken
    for one of the daemon's own open files (its index, its bus socket)."""
    holder = received_fds.get()
    if not isinstance(value, int) or holder is None or value not in holder.fds:
        raise InvalidArgument("option fd: no file descriptor came with the call at that "
                              "index (pass the open file in the message, D-Bus type 'h')")
    check_caller_fd(value, "fd", write=write)
    return value


def keep_fd(fd: int | None) -> int | None:
    """A descriptor of the job's own (the call's are closed when the method returns)."""
    return None if fd is None else os.dup(fd)


def close_fd(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def announce_changes(interface: ServiceInterface, before: dict[str, Any],
                     after: dict[str, Any]) -> None:
    """Emit PropertiesChanged for the cached properties that differ, if any."""
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    if changed:
        interface.emit_properties_changed(changed)
