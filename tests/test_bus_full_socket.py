"""The daemon's bus connection survives a bus that reads slower than it writes.

dbus-fast closes its connection when a direct write finds the socket full; the daemon's
connection (``hostvold.server.bus.connect``) waits for the socket instead. A stopped
dbus-daemon stands for one that is short of CPU while the daemon exports 10,000 volumes."""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import signal
import socket
import threading
import time

from dbus_fast import Message

from hostvold.server.bus import _SendsThatWait, connect
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


def test_a_message_with_descriptors_waits_for_a_full_socket() -> None:
    """dbus-fast sends a message carrying descriptors with one ``sendmsg`` and drops them
    after it, whatever it returned; a full socket used to close the bus (the daemon then
    served no one). The daemon's socket waits for room instead, and the descriptor goes."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filled += ours.send(b"x" * 65536)

    def drain() -> None:  # the bus reads again, a moment later
        time.sleep(0.3)
        left = filled
        while left:
            left -= len(theirs.recv(min(left, 1 << 20)))

    reader = threading.Thread(target=drain)
    reader.start()
    sent_fd = os.open("/dev/null", os.O_RDONLY)
    try:
        started = time.monotonic()
        wrapped = _SendsThatWait(ours)
        assert wrapped.sendmsg([b"with an fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", [sent_fd]))]) > 0
        assert time.monotonic() - started >= 0.2
        reader.join()
        theirs.settimeout(5)
        data, fds, _, _ = socket.recv_fds(theirs, 1 << 20, 4)
        assert data.endswith(b"with an fd") and len(fds) == 1
        for fd in fds:
            os.close(fd)
    finally:
        os.close(sent_fd)
        ours.close()
        theirs.close()
