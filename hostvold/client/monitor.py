"""``hostvolctl monitor``: what changes, as it happens, like ``udisksctl monitor``.

Signals only (no polling): objects added and removed, properties changed (a job's progress
among them), jobs completed, and the daemon joining or leaving the bus. One line per event,
or one JSON object per line with ``--json``. Runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any

from dbus_fast import Message

from hostvold.client.connection import BUS_NAME, ROOT_PATH, Client
from hostvold.client.output import plain
from hostvold.core.units import human_size

SIZES = {"Size", "Total", "Free", "Allocated", "Provisioned", "BytesDone", "BytesTotal"}


def describe(path: str) -> tuple[str, str]:
    """(kind, id) of one of our object paths: ``/org/hostvold1/volumes/a_b`` -> volume a-b."""
    parts = path.removeprefix(ROOT_PATH).strip("/").split("/")
    if len(parts) == 2:
        return parts[0].removesuffix("s"), parts[1].replace("_", "-")
    return "daemon", ""


def shown(name: str, value: Any) -> str:
    if name in SIZES and isinstance(value, int):
        return human_size(value)
    if name == "Progress" and isinstance(value, float):
        return f"{value * 100:.0f}%"
    if isinstance(value, str) and " " in value:
        return json.dumps(value)
    return str(value)


def event_of(message: Message) -> dict[str, Any] | None:
    """One signal as an event, or None for signals that say nothing to a person."""
    member, body = message.member or "", list(message.body)
    if member == "NameOwnerChanged":
        if body[0] != BUS_NAME:
            return None
        return {"kind": "daemon", "id": "", "event": "started" if body[2] else "stopped"}
    if member == "InterfacesAdded":
        kind, object_id = describe(str(body[0]))
        return {"kind": kind, "id": object_id, "event": "added"}
    if member == "InterfacesRemoved":
        kind, object_id = describe(str(body[0]))
        return {"kind": kind, "id": object_id, "event": "removed"}
    kind, object_id = describe(message.path or "")
    if member == "PropertiesChanged":
        return {"kind": kind, "id": object_id, "event": "changed",
                "changes": plain(body[1])}
    if member == "Completed":
        ok, name, text = bool(body[0]), str(body[1]), str(body[2])
        return {"kind": kind, "id": object_id, "event": "completed" if ok else "failed",
                **({} if ok else {"error": f"{name}: {text}"})}
    return {"kind": kind, "id": object_id, "event": member, "body": plain(body)}


def line_of(event: dict[str, Any], when: str) -> str:
    what = f"{when} {event['kind']} {event['id']}".rstrip() + f" {event['event']}"
    if "changes" in event:
        what += " " + " ".join(f"{k}={shown(k, v)}" for k, v in sorted(event["changes"].items()))
    if "error" in event:
        what += f" ({event['error']})"
    return what


async def cmd_monitor(client: Client, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def on_signal(message: Message) -> None:
        event = event_of(message)
        if event is None:
            return
        now = time.time()
        if args.json:
            print(json.dumps({"time": round(now, 3), **event}, sort_keys=True), flush=True)
        else:
            when = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
            print(line_of(event, when), flush=True)

    client.handlers.append(on_signal)
    for rule in (f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}'",
                 "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                 f"arg0='{BUS_NAME}'"):
        await client.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                          [rule], destination="org.freedesktop.DBus")
    if args.json:  # the first line says the subscription is in place
        print(json.dumps({"time": round(time.time(), 3), "kind": "daemon", "id": "",
                          "event": "monitoring"}), flush=True)
    else:
        print(f"monitoring {BUS_NAME} on the {client.address} bus (Ctrl-C to stop)", flush=True)
    await stop.wait()
