"""Rough edges found by random D-Bus calls: a cancelled create or delete leaves nothing
half done, a new volume smaller than its source is refused at the call, the
attachment of a detached volume is ``("", "")``, an attach to a domain that does not exist
or an import whose image dooms it is refused at the call, and a volume smaller than 4 KiB
can lose its snapshots."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostvold.core.ids import new_id
from hostvold.ops.operations import Operations
from hostvold.server.volume import VolumeProperties, _attachment
from tests.conftest import Host
from tests.test_dbus import (  # noqa: F401  (fixtures)
    Cli,
    _call,
    _client,
    running,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20
PATIENCE = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]  # loop turns before the cancel


def files_of_volume(ops: Operations, volume_id: str) -> list[str]:
    base = ops.store.naming.base_name(volume_id)
    return sorted(path.name for share in ops.store.shares
                  for path in share.mount_point.iterdir() if path.name.startswith(base))


async def cancelled_after(turns: int, work: Any) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(work)
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return task


def no_never_retrieved(caplog: pytest.LogCaptureFixture) -> None:
    gc.collect()  # an unretrieved future's error is logged when it is collected
    assert "never retrieved" not in caplog.text


async def test_a_cancelled_create_leaves_nothing(host_factory: Callable[..., Host],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    host = host_factory(256)
    ops = await host.start()
    cancelled = 0
    for turns in PATIENCE:
        for fmt in ("raw", "qcow2"):
            vid = new_id()
            task = await cancelled_after(turns, ops.create_volume(id=vid, size=8 * MiB,
                                                                  format=fmt))
            if not task.cancelled():  # it ended before the cancel came: a whole volume
                assert ops.store.get_volume(vid).state == "available"
                continue
            cancelled += 1
            await asyncio.sleep(0.05)  # anything left running would write by now
            assert ops.store.find(vid) is None
            assert files_of_volume(ops, vid) == []
    assert cancelled > 0
    no_never_retrieved(caplog)
    await host.start()  # a restart finds nothing of them to recover either
    assert all(meta.state == "available" for meta in host.ops.store.list_volumes())
    host.stop()


def slowed(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> threading.Event:
    """``module.name`` made to take 0.3 s in the share's worker; the event: it began."""
    begun = threading.Event()
    original = getattr(__import__(module, fromlist=[name]), name)

    def slow(*args: Any) -> Any:
        begun.set()
        time.sleep(0.3)
        return original(*args)

    monkeypatch.setattr(f"{module}.{name}", slow)
    return begun


async def cancel_when(begun: threading.Event, work: Any) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(work)
    while not begun.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return task


async def test_a_create_cancelled_while_its_record_is_written(
        host_factory: Callable[..., Host], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    host = host_factory(256)
    ops = await host.start()
    begun = slowed(monkeypatch, "hostvold.ops.store", "write_meta")
    vid = new_id()
    task = await cancel_when(begun, ops.create_volume(id=vid, size=8 * MiB))
    assert task.cancelled()
    await asyncio.sleep(0.5)  # the slowed write has long ended
    assert ops.store.find(vid) is None
    assert files_of_volume(ops, vid) == []
    no_never_retrieved(caplog)
    host.stop()


async def test_a_delete_cancelled_while_removing_files_finishes(
        host_factory: Callable[..., Host], monkeypatch: pytest.MonkeyPatch) -> None:
    host = host_factory(256)
    ops = await host.start()
    vid = (await ops.create_volume(size=4 * MiB)).id
    begun = slowed(monkeypatch, "hostvold.ops.volumes", "remove_volume_files")
    await cancel_when(begun, ops.delete_volume(vid))
    assert ops.store.find(vid) is None  # gone, not listed as deleting
    assert files_of_volume(ops, vid) == []
    host.stop()


async def test_a_cancelled_delete_is_all_or_nothing(host_factory: Callable[..., Host],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    host = host_factory(256)
    ops = await host.start()
    outcomes = set()
    for turns in PATIENCE:
        vid = (await ops.create_volume(size=4 * MiB)).id
        await cancelled_after(turns, ops.delete_volume(vid))
        meta = ops.store.find(vid)
        if meta is None:
            outcomes.add("gone")
            assert files_of_volume(ops, vid) == []
        else:
            outcomes.add("kept")
            assert meta.state == "available" and meta.operation is None
            assert files_of_volume(ops, vid)
            await ops.delete_volume(vid)
        assert all(m.state != "deleting" for m in ops.store.list_volumes())
    assert "gone" in outcomes
    no_never_retrieved(caplog)
    host.stop()


def test_attachment_is_two_empty_strings_when_detached() -> None:
    from hostvold.core.records import VolumeMeta
    meta = VolumeMeta(id=new_id(), size=MiB, format="raw", provisioning="thin",
                      created="2024-01-01T00:00:00Z", state="available", share="s:/x",
                      active="volume-x")
    assert _attachment(meta) == ("", "")
    attached = meta.evolve(state="in-use", attachment={"domain": "guest", "target": "vdb"})
    assert _attachment(attached) == ("guest", "vdb")
    doc = VolumeProperties.Attachment.__doc__ or ""
    assert '("", "")' in doc and "(ss)" in doc


# ---- over D-Bus -------------------------------------------------------------------------

def dbus_path(kind: str, object_id: str) -> str:
    return f"/org/hostvold1/{kind}/{object_id.replace('-', '_')}"


async def raw_call(bus: MessageBus, path: str, interface: str, member: str,
                   options: dict[str, Variant]) -> Message:
    reply = await bus.call(Message(destination="org.hostvold1", path=path,
                                   interface=interface, member=member, signature="a{sv}",
                                   body=[options]))
    assert reply is not None
    return reply


async def job_end(bus: MessageBus, job_path: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        (state,) = await _call(bus, job_path, "org.freedesktop.DBus.Properties", "Get", "ss",
                               ["org.hostvold1.Job", "State"])
        if state.value != "running" or time.monotonic() > deadline:
            return str(state.value)
        await asyncio.sleep(0.05)


async def test_a_smaller_copy_is_refused_at_the_call(
        running: Callable[..., tuple[Host, Cli]]) -> None:  # noqa: F811
    _, cli = running()
    vid = cli.json("create", "64M")["Id"]
    sid = cli.json("snapshot", "create", vid)["Id"]
    cli.json("extend", vid, "96M")  # the snapshot stays 64 MiB, the volume is 96 MiB now
    bus = await _client(cli.address)
    try:
        volume, snapshot = dbus_path("volumes", vid), dbus_path("snapshots", sid)
        (attachment,) = await _call(bus, volume, "org.freedesktop.DBus.Properties", "Get",
                                    "ss", ["org.hostvold1.Volume", "Attachment"])
        assert attachment.signature == "(ss)" and list(attachment.value) == ["", ""]
        for path, interface, member, size in (
                (snapshot, "org.hostvold1.Snapshot", "CreateVolume", 32 * MiB),
                (volume, "org.hostvold1.Volume", "Clone", 64 * MiB)):
            reply = await raw_call(bus, path, interface, member, {"size": Variant("t", size)})
            assert reply.message_type == MessageType.ERROR, reply.body
            assert reply.error_name == "org.hostvold1.Error.InvalidArgument"
            assert "smaller" in reply.body[0]
        # as large as the snapshot, though smaller than the volume now: accepted, and made
        reply = await raw_call(bus, snapshot, "org.hostvold1.Snapshot", "CreateVolume",
                               {"size": Variant("t", 64 * MiB)})
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert await job_end(bus, reply.body[0]) == "completed"
    finally:
        bus.disconnect()
    assert len(cli.json("volumes")) == 2


async def test_snapshots_of_a_volume_smaller_than_4k_are_deleted(
        host_factory: Callable[..., Host]) -> None:
    """qemu-img cannot open a raw file whose size is not a multiple of 4 KiB for writing
    with O_DIRECT (``-t none``): the commit of a 512-byte volume's snapshot failed."""
    host = host_factory(256)
    ops = await host.start()
    vid = (await ops.create_volume(size=512, format="raw")).id
    first = await ops.create_snapshot(vid)
    second = await ops.create_snapshot(vid)
    meta = ops.store.get_volume(vid)
    directory = ops.store.files_of(meta).directory
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512",
                    str(directory / meta.active)], check=True, capture_output=True)
    for snapshot in (first, second):
        await ops.delete_snapshot(vid, snapshot.id)
    meta = ops.store.get_volume(vid)
    assert meta.snapshots == {} and meta.operation is None and meta.state == "available"
    assert meta.active == ops.store.naming.base_name(vid)
    assert (directory / meta.active).read_bytes() == b"\x5a" * 512
    host.stop()


async def test_attach_to_a_domain_that_does_not_exist_is_refused_at_the_call(
        running: Callable[..., tuple[Host, Cli]]) -> None:  # noqa: F811
    _, cli = running()
    vid = cli.json("create", "4M")["Id"]
    jobs = len(cli.json("jobs"))
    bus = await _client(cli.address)
    try:
        reply = await raw_call(bus, dbus_path("volumes", vid), "org.hostvold1.Volume",
                               "Attach", {"domain": Variant("s", "no-such-domain-here")})
    finally:
        bus.disconnect()
    assert reply.message_type == MessageType.ERROR, reply.body
    assert reply.error_name == "org.hostvold1.Error.NotFound"
    assert "no-such-domain-here" in reply.body[0]
    assert len(cli.json("jobs")) == jobs  # no job was made
    assert cli.json("show", vid)["State"] == "available"


async def test_an_import_its_image_dooms_is_refused_at_the_call(
        running: Callable[..., tuple[Host, Cli]], tmp_path: Path) -> None:  # noqa: F811
    _, cli = running()
    image = tmp_path / "image.raw"
    image.write_bytes(b"\x01" * MiB)
    bus = await MessageBus(bus_address=cli.address, bus_type=BusType.SYSTEM,
                           negotiate_unix_fd=True).connect()
    fd = os.open(image, os.O_RDONLY)
    try:
        for options, error, words in (
                ({"size": Variant("t", 512)}, "InvalidArgument", "smaller"),
                ({"source_format": Variant("s", "qcow2")}, "UnsafeImage", "not a qcow2")):
            reply = await bus.call(Message(
                destination="org.hostvold1", path="/org/hostvold1",
                interface="org.hostvold1.Manager", member="ImportVolume", signature="a{sv}",
                body=[{"fd": Variant("h", 0), **options}], unix_fds=[fd]))
            assert reply is not None and reply.message_type == MessageType.ERROR, reply
            assert reply.error_name == f"org.hostvold1.Error.{error}", reply.body
            assert words in reply.body[0]
    finally:
        os.close(fd)
        bus.disconnect()
    assert cli.json("jobs") == [] and cli.json("volumes") == []
