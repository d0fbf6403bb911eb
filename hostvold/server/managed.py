"""``ObjectManager.GetManagedObjects`` on our root, from pieces marshalled ahead (P6).

The answer for ten thousand volumes is ten megabytes. Building it walks every record and
marshals every value, and both cost more per object as the objects outgrow the CPU's caches.
So each volume and snapshot keeps its own entry of the answer as marshalled bytes, made the
first time it is asked for and dropped whenever the volume's record changes, and the answer
is those entries joined. That is sound because D-Bus aligns each entry of a dict
array to 8 bytes counted from the message's start, and the body starts 8-aligned: an entry's
bytes are the same wherever it lands. Shares, jobs and groups (few) are built afresh each time.

dbus-fast's own handler also asks of every getter whether it is a coroutine and checks after
every property whether its whole result is complete; every getter here is synchronous and
reads cached state, so one pass calls each getter once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from dbus_fast import Message, MessageType, Variant
from dbus_fast._private.marshaller import Marshaller
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from hostvold.core.collector import collector_paused
from hostvold.server.bus import ROOT_PATH

SIGNATURE = "a{oa{sa{sv}}}"
_MISSING = object()


class CachedEntry:
    """Mixed into an interface whose object keeps its marshalled entry: the owner sets
    ``managed_entry`` back to None whenever a property may have changed."""

    managed_entry: bytes | None = None


def managed_objects(bus: MessageBus) -> Callable[[Message], bool | None]:
    def handle(message: Message) -> bool | None:
        if (message.message_type != MessageType.METHOD_CALL
                or message.member != "GetManagedObjects" or message.path != ROOT_PATH
                or message.interface not in (None, "org.freedesktop.DBus.ObjectManager")):
            return None
        try:
            with collector_paused():  # tens of thousands of new objects, none in a cycle
                entries = [_entry(node, interfaces)
                           for node, interfaces in bus._path_exports.items()
                           if node.startswith(f"{ROOT_PATH}/")]
        except Exception:  # a getter that failed: dbus-fast's handler answers with its error
            return None
        bus.send(JoinedReply(message, entries))  # dbus-fast sends only a plain Message back
        return True
    return handle


def _entry(node: str, interfaces: dict[str, ServiceInterface]) -> bytes:
    only = next(iter(interfaces.values())) if len(interfaces) == 1 else None
    kept = getattr(only, "managed_entry", _MISSING)
    if isinstance(kept, bytes):
        return kept
    entry = marshal_entry(node, {interface.name: property_values(interface)
                                 for interface in interfaces.values()})
    if kept is None:  # an object that keeps its entry until it changes
        only.managed_entry = entry  # type: ignore[union-attr]
    return entry


def marshal_entry(node: str, values: dict[str, dict[str, Variant]]) -> bytes:
    """One ``{oa{sa{sv}}}`` entry: a one-entry array marshalled alone, without the array's
    length and the padding after it (the entry starts 8-aligned, as in any answer)."""
    return bytes(Marshaller(SIGNATURE, [{node: values}]).marshall()[8:])


def property_values(interface: ServiceInterface) -> dict[str, Variant]:
    """Every readable property of ``interface``, each checked against its signature."""
    return {prop.name: Variant(prop.signature, prop.prop_getter(interface))
            for prop in ServiceInterface._get_properties(interface)
            if not prop.disabled and prop.access.readable()}


class JoinedReply(Message):
    """The method return of GetManagedObjects whose body is ``entries`` joined: dbus-fast
    marshals the header (with an empty array), the body is put in its place."""

    def __init__(self, call: Message, entries: list[bytes]) -> None:
        super().__init__(message_type=MessageType.METHOD_RETURN, reply_serial=call.serial,
                         destination=call.sender, signature=SIGNATURE, body=[{}])
        self.entries = entries

    def _marshall(self, negotiate_unix_fd: bool) -> bytearray:
        empty: bytearray = super()._marshall(negotiate_unix_fd)
        if empty[0:1] != b"l":  # dbus-fast marshals little-endian; anything else: its way
            raise ValueError("unexpected byte order")
        header = empty[:-8]  # the empty body: the array's length and the padding to 8
        pieces: list[bytes] = []
        for entry in self.entries:  # each entry, then the padding to the next one's start
            pieces += (entry, _PADDING[-len(entry) % 8])
        if pieces:
            pieces.pop()  # no padding after the last entry
        array = sum(len(piece) for piece in pieces)
        struct.pack_into("<I", header, 4, 8 + array)
        # one copy of the whole answer, into a buffer of its final size
        return bytearray().join([header, struct.pack("<I", array), b"\0\0\0\0", *pieces])


_PADDING = [b"\0" * n for n in range(8)]
