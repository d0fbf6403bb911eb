"""Smoke tests: each real service of the harness is up and does what later issues need."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><graphics type='vnc' port='-1'
  autoport='yes' listen='127.0.0.1'/></devices>
</domain>"""


def test_loop_share_has_real_capacity_and_enospc(mounted_ext4: Callable[..., Path]) -> None:
    point = mounted_ext4("smoke", 32)
    st = os.statvfs(point)
    assert 20 << 20 < st.f_blocks * st.f_frsize <= 32 << 20
    with pytest.raises(OSError) as info, open(point / "fill", "wb") as fill:
        chunk = b"\xa5" * (1 << 20)
        for _ in range(64):
            fill.write(chunk)
            fill.flush()
    assert info.value.errno == 28  # ENOSPC


def test_libvirtd_runs_a_tcg_domain(libvirtd: str) -> None:
    import libvirt

    conn = libvirt.open(libvirtd)
    try:
        name = f"hostvold-smoke-{os.getpid()}"
        dom = conn.createXML(DOMAIN_XML.format(name=name), 0)
        try:
            state, _ = dom.state()
            assert state == libvirt.VIR_DOMAIN_RUNNING
        finally:
            dom.destroy()
    finally:
        conn.close()


async def test_private_dbus_daemon_answers(dbus_daemon: str) -> None:
    from dbus_fast import BusType, Message, RequestNameReply
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=dbus_daemon, bus_type=BusType.SYSTEM).connect()
    try:
        reply = await asyncio.wait_for(bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="ListNames")), 5)
        assert reply is not None and "org.freedesktop.DBus" in reply.body[0]
        owned = await bus.request_name("org.hostvold1")
        assert owned == RequestNameReply.PRIMARY_OWNER  # root may own names here
    finally:
        bus.disconnect()


def test_nonroot_user_cannot_own_names(dbus_daemon: str) -> None:
    """The policy is system-bus-like: an unprivileged user may not take a well-known name."""
    user = "hostvold-test"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", user], check=True)
    result = subprocess.run(
        ["runuser", "-u", user, "--", "dbus-send", f"--bus={dbus_daemon}", "--print-reply",
         "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
         "org.freedesktop.DBus.RequestName", "string:org.hostvold1", "uint32:0"],
        capture_output=True, text=True)
    assert result.returncode != 0
    assert "AccessDenied" in result.stderr or "not allowed" in result.stderr
