"""One raw D-Bus method call, for tests that run it as another user (``runuser``).

    python bus_call.py ADDRESS OBJECT_PATH INTERFACE MEMBER OPTIONS_JSON

OPTIONS_JSON maps option names to ``[signature, value]``; signature ``fd`` takes
``[how, path]`` instead, the file opened here, with this process's rights, ``how`` one of
``ro``, ``wo``, ``rw``, ``path`` (O_PATH) or ``new`` (created, O_EXCL). Prints one JSON
line: ``{"error": name, "message": text}`` or ``{"reply": [...]}``; an open that fails
prints ``{"open_error": errno name}``. Imports only dbus-fast and the standard library.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

FLAGS = {"ro": os.O_RDONLY, "wo": os.O_WRONLY, "rw": os.O_RDWR,
         "path": getattr(os, "O_PATH", 0o10000000),
         "new": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


async def call(address: str, path: str, interface: str, member: str,
               options: dict[str, list[Any]]) -> dict[str, Any]:
    body: dict[str, Variant] = {}
    fds: list[int] = []
    for key, (signature, value) in options.items():
        if signature == "fd":
            how, file_path = value
            try:
                fds.append(os.open(file_path, FLAGS[how], 0o666))
            except OSError as exc:
                return {"open_error": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
            body[key] = Variant("h", len(fds) - 1)
        else:
            body[key] = Variant(signature, value)
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                           negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="org.hostvold1", path=path,
                                       interface=interface, member=member, signature="a{sv}",
                                       body=[body], unix_fds=fds))
    finally:
        bus.disconnect()
        for fd in fds:
            os.close(fd)
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        return {"error": reply.error_name, "message": str(reply.body[0]) if reply.body else ""}
    return {"reply": plain(reply.body)}


def main() -> int:
    address, path, interface, member, options = sys.argv[1:6]
    print(json.dumps(asyncio.run(call(address, path, interface, member, json.loads(options)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
