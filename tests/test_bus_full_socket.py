"""The daemon's bus connection survives a bus that reads slower than it writes.

dbus-fast closes its connection when a direct write finds the socket full; the daemon's
connection (``hostvold.server.bus.connect``) waits for the socket instead. A stopped
dbus-daemon stands for one that is short of CPU while the daemon exports 10,000 volumes."""

from __future__ import annotations

import os
import shutil
import signal

from dbus_fast import Message

from hostvold.server.bus import connect
from tests.conftest import PrivateBus, need


async def test_signals_wait_for_a_full_socket() -> None:
    need(shutil.which("dbus-daemon") is not None, "dbus-daemon (Debian package dbus)")
    private = PrivateBus("")
    try:
        bus = await connect(private.address)
        os.kill(private.proc.pid, signal.SIGSTOP)
        try:  # far more than a socket buffer holds, none of it read meanwhile
            for _ in range(5000):
                bus.send(Message.new_signal("/org/hostvold1/test", "org.hostvold1.Test",
                                            "Filled", "s", ["x" * 200]))
            assert bus.connected
        finally:
            os.kill(private.proc.pid, signal.SIGCONT)
        reply = await bus.call(Message(destination="org.freedesktop.DBus",
                                       path="/org/freedesktop/DBus",
                                       interface="org.freedesktop.DBus", member="GetId"))
        assert reply is not None and reply.body and bus.connected
        bus.disconnect()
    finally:
        private.close()
