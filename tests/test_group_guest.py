"""Group snapshots (SPEC section 5a) under the real Linux guest: one point in time across
the volumes of a running VM, and of two VMs, checked from what the guests wrote.

A pair writer in the guest (``guestio pair``) writes record K on volume A, fsyncs, then
mark K on volume B, fsyncs: a point in time that holds a mark whose record is missing
was not one point in time. Every group is read offline, from the standalone volumes its
``CreateVolumes`` made, with e2fsprogs. The daemon is driven over D-Bus directly (no CLI
command for groups is relied on); it is killed at every named step of a group's create
and delete, and the guest's domain is destroyed in the middle of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.bus_call import plain
from tests.conftest import DaemonProcess, Host
from tests.guest.image import GuestImage
from tests.guest.offline import FsCheck, check_image
from tests.guest.vm import RealGuest
from tests.guest_fixtures import GuestKeeper, mount_base_under_guest_mounts
from tests.test_dbus import Cli, with_bus

pytestmark = pytest.mark.integration

ROOT = "/org/hostvold1"
IFACE = "org.hostvold1."
VOLUME_SIZE = "32M"
WRITE_ORDER_GROUPS = 50  # group snapshots checked for write order while the pairs are written
ONE_BY_ONE = 6  # the contrast: rounds of two single-volume snapshots one after the other


# ---- D-Bus, directly ---------------------------------------------------------------------

class BusError(AssertionError):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def object_path(kind: str, object_id: str) -> str:
    return f"{ROOT}/{kind}/{object_id.replace('-', '_')}"


def id_of(path: str) -> str:
    return path.rsplit("/", 1)[1].replace("_", "-")


async def _call(bus: MessageBus, path: str, interface: str, member: str, signature: str,
                body: list[Any]) -> list[Any]:
    reply = await bus.call(Message(destination="org.hostvold1", path=path,
                                   interface=interface, member=member, signature=signature,
                                   body=body))
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise BusError(reply.error_name or "", str(reply.body[0]) if reply.body else "")
    return list(reply.body)


class Api:
    """hostvold's objects over one private bus, each call on a connection of its own."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def _connect(self) -> MessageBus:
        return await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()

    def call(self, path: str, interface: str, member: str, signature: str = "",
             body: list[Any] | None = None) -> list[Any]:
        async def run() -> list[Any]:
            bus = await self._connect()
            try:
                return await _call(bus, path, interface, member, signature, body or [])
            finally:
                bus.disconnect()
        return asyncio.run(run())

    def props(self, path: str, interface: str) -> dict[str, Any]:
        (found,) = self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                             [f"{IFACE}{interface}"])
        return dict(plain(found))

    def job(self, path: str, interface: str, member: str, signature: str = "a{sv}",
            body: list[Any] | None = None, seconds: float = 300) -> dict[str, Any]:
        """Calls a job-returning method and waits for the job's end (its Completed signal,
        or its State when the signal came before we looked); a failed job raises."""
        async def run() -> dict[str, Any]:
            bus = await self._connect()
            try:
                done: dict[str, tuple[bool, str, str]] = {}
                arrived = asyncio.Event()

                def on_signal(message: Message) -> None:
                    if message.message_type == MessageType.SIGNAL and \
                            message.member == "Completed" and message.path:
                        done[message.path] = (bool(message.body[0]), str(message.body[1]),
                                              str(message.body[2]))
                        arrived.set()

                bus.add_message_handler(on_signal)
                await bus.call(Message(
                    destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                    body=[f"type='signal',sender='org.hostvold1',path_namespace='{ROOT}/jobs'"]))
                (job,) = await _call(bus, path, f"{IFACE}{interface}", member, signature,
                                     body if body is not None else [{}])
                deadline = time.monotonic() + seconds
                while job not in done:
                    (state,) = await _call(bus, job, "org.freedesktop.DBus.Properties", "Get",
                                           "ss", [f"{IFACE}Job", "State"])
                    if state.value != "running":
                        break
                    left = deadline - time.monotonic()
                    assert left > 0, f"job {job} ({interface}.{member}) still runs"
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), min(left, 2))
                (found,) = await _call(bus, job, "org.freedesktop.DBus.Properties", "GetAll",
                                       "s", [f"{IFACE}Job"])
                result = dict(plain(found))
                if result["State"] != "completed":
                    raise BusError(*result["Error"])
                return result
            finally:
                bus.disconnect()
        return asyncio.run(run())

    # ---- what the tests ask -----------------------------------------------------------------

    @staticmethod
    def _group_options(domains: list[str], consistency: str | None,
                       quiesce: str | None) -> dict[str, Variant]:
        options: dict[str, Variant] = {}
        if len(domains) == 1:
            options["domain"] = Variant("s", domains[0])
        elif domains:
            options["domains"] = Variant("as", domains)
        if consistency:
            options["consistency"] = Variant("s", consistency)
        if quiesce:
            options["quiesce"] = Variant("s", quiesce)
        return options

    def create_group(self, volumes: list[str], domains: list[str] | None = None,
                     consistency: str | None = None, quiesce: str | None = None) -> str:
        result = self.job(ROOT, "Manager", "CreateGroupSnapshot", "aoa{sv}", [
            [object_path("volumes", v) for v in volumes],
            self._group_options(domains or [], consistency, quiesce)])
        assert "/groups/" in result["Objects"][-1], result["Objects"]
        return id_of(result["Objects"][-1])

    def start_group(self, volumes: list[str], domains: list[str] | None = None,
                    consistency: str | None = None, quiesce: str | None = None) -> None:
        """The create asked for, not waited for (the daemon is about to die in it)."""
        with contextlib.suppress(BusError):
            self.call(ROOT, f"{IFACE}Manager", "CreateGroupSnapshot", "aoa{sv}", [
                [object_path("volumes", v) for v in volumes],
                self._group_options(domains or [], consistency, quiesce)])

    def group(self, group_id: str) -> dict[str, Any]:
        return self.props(object_path("groups", group_id), "GroupSnapshot")

    def groups(self) -> dict[str, dict[str, Any]]:
        (managed,) = self.call(ROOT, "org.freedesktop.DBus.ObjectManager",
                               "GetManagedObjects")
        return {id_of(str(path)): dict(plain(interfaces[f"{IFACE}GroupSnapshot"]))
                for path, interfaces in managed.items()
                if f"{IFACE}GroupSnapshot" in interfaces}

    def group_copies(self, group_id: str) -> dict[str, str]:
        """Member volume id -> the new standalone volume of its point in time."""
        members = [id_of(p) for p in self.group(group_id)["Volumes"]]
        result = self.job(object_path("groups", group_id), "GroupSnapshot", "CreateVolumes")
        made = [id_of(p) for p in result["Objects"] if "/volumes/" in p]
        assert len(made) == len(members), (members, result["Objects"])
        return dict(zip(members, made, strict=True))

    def delete_group(self, group_id: str) -> None:
        self.job(object_path("groups", group_id), "GroupSnapshot", "Delete")

    def start_group_delete(self, group_id: str) -> None:
        with contextlib.suppress(BusError):
            self.call(object_path("groups", group_id), f"{IFACE}GroupSnapshot", "Delete",
                      "a{sv}", [{}])

    def volume(self, volume_id: str) -> dict[str, Any]:
        return self.props(object_path("volumes", volume_id), "Volume")

    def delete_volume(self, volume_id: str) -> None:
        self.job(object_path("volumes", volume_id), "Volume", "Delete")

    def snapshot(self, volume_id: str) -> str:
        (path,) = self.call(object_path("volumes", volume_id), f"{IFACE}Volume",
                            "CreateSnapshot", "a{sv}", [{}])
        return id_of(str(path))

    def snapshot_copy(self, snapshot_id: str) -> str:
        result = self.job(object_path("snapshots", snapshot_id), "Snapshot", "CreateVolume")
        return id_of(result["Objects"][-1])

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.job(object_path("snapshots", snapshot_id), "Snapshot", "Delete")


# ---- the guest's console, read as it grows ------------------------------------------------

class Acks:
    """The last acknowledgement of each tag on a guest's console, read incrementally (the
    console grows by kilobytes a second: reading it whole at every look would cost more
    than the looks)."""

    def __init__(self, guest: RealGuest) -> None:
        self.guest = guest
        self.offset = guest.offset()
        self.partial = b""
        self.last: dict[str, int] = {}
        self.problems: list[str] = []
        self.lock = threading.Lock()

    def _read(self) -> None:
        with self.lock, open(self.guest.console, "rb") as log:
            log.seek(self.offset)
            data = log.read()
            self.offset += len(data)
            *lines, self.partial = (self.partial + data).split(b"\n")
            for raw in lines:
                parts = raw.decode(errors="replace").split()
                if len(parts) == 3 and parts[0] == "A":
                    with contextlib.suppress(ValueError):
                        self.last[parts[1]] = int(parts[2])
                elif len(parts) >= 2 and parts[0] in ("E", "X"):
                    self.problems.append(" ".join(parts))

    def acked(self, tag: str) -> int:
        self._read()
        return self.last.get(tag, -1)

    def wait(self, tag: str, beyond: int, seconds: float = 60) -> int:
        """Waits for an acknowledgement after ``beyond``; returns the last one."""
        deadline = time.monotonic() + seconds
        while True:
            last = self.acked(tag)
            failed = [p for p in self.problems if p.split()[1] == tag]
            assert not failed, f"the writer {tag} stopped: {failed}\n{self.guest.tail()}"
            if last > beyond:
                return last
            assert time.monotonic() < deadline, \
                f"{self.guest.name}: no record after {beyond} on {tag}\n{self.guest.tail()}"
            time.sleep(0.05)

    def moves(self, tag: str, count: int = 3, seconds: float = 60) -> int:
        return self.wait(tag, self.acked(tag) + count - 1, seconds)


# ---- fixtures -----------------------------------------------------------------------------

shared_base = pytest.fixture(name="shared_base")(mount_base_under_guest_mounts)


@pytest.fixture(scope="module")
def second_keeper(libvirtd: str, guest_image: GuestImage,
                  guest_mounts: Path) -> Iterator[GuestKeeper]:
    consoles = guest_mounts / "consoles-second"
    consoles.mkdir()
    keeper = GuestKeeper(guest_image, libvirtd, consoles, prefix="hostvold-guest-b")
    yield keeper
    keeper.close()


def disks_of(guest: RealGuest) -> int:
    conn = libvirt.open(guest.uri)
    try:
        return int(conn.lookupByName(guest.name).XMLDesc(0).count("<disk "))
    except libvirt.libvirtError:
        return 0
    finally:
        conn.close()


def kept(keeper: GuestKeeper) -> Iterator[RealGuest]:
    """The keeper's guest for one test; one left with disks (a test that failed half-way)
    is destroyed, so the next test boots a clean one."""
    guest = keeper.get()
    yield guest
    if guest.is_running() and disks_of(guest):
        keeper.close()


@pytest.fixture
def guest(guest_keeper: GuestKeeper) -> Iterator[RealGuest]:
    yield from kept(guest_keeper)


@pytest.fixture
def second_guest(second_keeper: GuestKeeper) -> Iterator[RealGuest]:
    yield from kept(second_keeper)


@dataclass
class Rig:
    """One hostvold (restartable) on its own bus and shares."""

    config: Path
    api: Api
    cli: Cli
    factory: Callable[..., DaemonProcess]
    process: DaemonProcess
    host: Host

    def restart(self, crash_at: str | None = None, wait: bool = True) -> DaemonProcess:
        if self.process.proc.poll() is None:
            assert self.process.stop() == 0
        env = {"HOSTVOLD_CRASH_AT": crash_at} if crash_at else None
        self.process = self.factory(self.config, env=env, wait=wait)
        return self.process

    def crash(self, point: str, start: Callable[[], None]) -> None:
        """The daemon restarted to die at ``point`` in the operation ``start`` asks for."""
        crashing = self.restart(point)
        start()
        try:
            code: int | None = crashing.proc.wait(90)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 86, f"{point} not reached ({code}): {crashing.log_text()[-3000:]}"

    def log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.config.parent.glob("hostvold-*.log")))


@pytest.fixture
def rig(host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess],
        shared_base: Path) -> Callable[[str], Rig]:
    def start(extra: str) -> Rig:
        address = bus_factory("hostvold")
        host = host_factory(1536, extra=extra,
                            mount_point_base=shared_base / str(time.monotonic_ns()))
        config = with_bus(host, address)
        return Rig(config, Api(address), Cli(address), daemon_factory,
                   daemon_factory(config), host)
    return start


# ---- volumes in the guest -------------------------------------------------------------------

def attach(rig: Rig, guest: RealGuest, acks: Acks) -> str:
    """A new volume attached to the guest: ext4 made by the guest, its writer going."""
    vid = str(rig.cli.json("create", VOLUME_SIZE)["Id"])
    rig.cli.json("attach", vid, guest.name)
    acks.wait(vid, 2, seconds=120)
    return vid


def start_pairs(guest: RealGuest, acks: Acks, a: str, b: str) -> str:
    """The pair writer over volumes a (records) and b (marks); its tag."""
    code, out = guest.run("/bin/guestctl", "pair", a, b)
    assert code == 0, out
    tag = f"pair-{a}"
    acks.wait(tag, 5)
    return tag


def detach_all(rig: Rig, guest: RealGuest, acks: Acks, volumes: list[str],
               pairs: dict[str, tuple[str, str]] | None = None) -> None:
    """The guest reads back every acknowledged record and pair; writers stop; detached."""
    for tag, (a, b) in (pairs or {}).items():
        last = acks.acked(tag)
        for vid in (a, b):
            code, out = guest.run("/bin/guestctl", "check", vid, "pairs")
            assert code == 0 and int(out.split()[1]) >= last + 1, \
                f"the guest lost an acknowledged pair on {vid}: {out}, {last} acknowledged"
    for vid in volumes:
        last = acks.acked(vid)
        assert guest.check(vid) >= last + 1, f"the guest lost an acknowledged record on {vid}"
    for vid in volumes:
        code, out = guest.run("/bin/guestctl", "stop", vid)
        assert code == 0, out
        rig.cli.json("detach", vid)


def file_of(api: Api, volume_id: str) -> tuple[Path, str]:
    info = api.volume(volume_id)["ConnectionInfo"]
    return Path(info["path"]), str(info["format"])


def read_copy(api: Api, volume_id: str, scratch: Path, replay: bool,
              files: tuple[str, ...] = ("pairs", "relay")) -> FsCheck:
    path, fmt = file_of(api, volume_id)
    fs = check_image(path, fmt, scratch, replay=replay, files=files)
    assert fs.fsck_clean, f"e2fsck found damage in the copy {volume_id}"
    if not replay:
        assert not fs.needed_recovery, "a quiesced point in time needed a journal replay"
    assert fs.stray == 0, f"a hole in the writer's records of {volume_id}"
    return fs


@dataclass
class Pairs:
    records: int  # in volume A's "pairs"
    marks: int  # in volume B's "pairs"

    @property
    def torn(self) -> bool:
        return self.marks > self.records


def read_pairs(api: Api, copies: dict[str, str], a: str, b: str, scratch: Path,
               replay: bool) -> tuple[Pairs, dict[str, FsCheck]]:
    checks = {vid: read_copy(api, copies[vid], scratch, replay) for vid in (a, b)}
    for vid, fs in checks.items():
        assert fs.files["pairs"][1] == 0, f"a hole in the pairs on {vid}'s copy"
    return Pairs(checks[a].files["pairs"][0], checks[b].files["pairs"][0]), checks


def pairs_hold(pairs: Pairs, before: int, after: int | None = None) -> None:
    """Every mark has its record (the write order), every pair acknowledged before the
    point in time is there, and (``after``) nothing from after it: the writer may have
    had one pair and the next record written but not yet acknowledged."""
    assert not pairs.torn, f"write order broken: {pairs.marks} marks, {pairs.records} records"
    assert pairs.marks >= before + 1, f"{pairs.marks} marks, {before} was acknowledged"
    if after is not None:
        assert pairs.records <= after + 3, f"{pairs.records} records, {after} acknowledged"


def check_group(api: Api, group_id: str, pairs: dict[str, tuple[str, str, int, int | None]],
                scratch: Path) -> dict[str, FsCheck]:
    """The group's new volumes: each pair (tag -> a, b, acknowledged before, after) read
    and checked. The copies are deleted after."""
    props = api.group(group_id)
    assert props["Problems"] == [], props
    copies = api.group_copies(group_id)
    checks: dict[str, FsCheck] = {}
    try:
        for a, b, before, after in pairs.values():
            found, read = read_pairs(api, copies, a, b, scratch, replay=not props["Quiesced"])
            pairs_hold(found, before, after)
            checks.update(read)
    finally:
        for made in copies.values():
            api.delete_volume(made)
    return checks


# ---- 1. write order -------------------------------------------------------------------------

def test_every_group_snapshot_keeps_the_write_order(rig: Callable[[str], Rig],
                                                    guest: RealGuest, scratch: Path) -> None:
    """Group snapshots taken one after the other while the guest writes dependent pairs
    across two volumes: in each, every mark on B has its record on A. Crash-consistent
    groups (no freeze: QEMU's transaction alone), every tenth quiesced; half named by the
    domain. The contrast: two single-volume snapshots one after the other."""
    setup = rig("[libvirt]\nquiesce = never\n")
    api = setup.api
    acks = Acks(guest)
    a, b = attach(setup, guest, acks), attach(setup, guest, acks)
    tag = start_pairs(guest, acks, a, b)
    started = time.monotonic()
    timings: dict[str, float] = {"create": 0.0, "copies": 0.0, "delete": 0.0}
    for number in range(WRITE_ORDER_GROUPS):
        before = acks.acked(tag)
        took = time.monotonic()
        group_id = api.create_group(
            [] if number % 2 else [a, b], domains=[guest.name] if number % 2 else None,
            consistency="quiesced" if number % 10 == 9 else None)
        timings["create"] += time.monotonic() - took
        after = acks.moves(tag, 1)  # an acknowledgement printed after the group was taken
        props = api.group(group_id)
        assert sorted(id_of(p) for p in props["Volumes"]) == sorted([a, b]), props
        assert len(props["Snapshots"]) == 2 and props["Problems"] == [], props
        assert props["Quiesced"] is (number % 10 == 9), props
        took = time.monotonic()
        check_group(api, group_id, {tag: (a, b, before, after)}, scratch)
        timings["copies"] += time.monotonic() - took
        took = time.monotonic()
        api.delete_group(group_id)
        timings["delete"] += time.monotonic() - took
    loop = time.monotonic() - started
    acknowledged = acks.acked(tag)
    print(f"\nwrite order held in {WRITE_ORDER_GROUPS} group snapshots "
          f"({acknowledged} pairs acknowledged) in {loop:.0f} s: "
          + ", ".join(f"{k} {v / WRITE_ORDER_GROUPS:.2f} s" for k, v in timings.items()))

    torn = 0
    for _ in range(ONE_BY_ONE):
        first, second = api.snapshot(a), api.snapshot(b)  # A's point in time, then B's
        copies = {a: api.snapshot_copy(first), b: api.snapshot_copy(second)}
        found, _ = read_pairs(api, copies, a, b, scratch, replay=True)
        torn += found.torn
        for made in copies.values():
            api.delete_volume(made)
        api.delete_snapshot(second)
        api.delete_snapshot(first)
    print(f"one volume after the other: {torn} of {ONE_BY_ONE} pairs of snapshots torn "
          "(a mark whose record is missing)")
    acks.moves(tag)
    detach_all(setup, guest, acks, [a, b], {tag: (a, b)})


# ---- 2. two VMs, paused together ------------------------------------------------------------

class Relay(threading.Thread):
    """A dependency across two VMs, relayed by the host: once the first VM acknowledged
    pair K, K is marked in the second VM (``guestio mark``, through its agent). So the
    second VM's relay file never holds more than the first VM's pairs."""

    def __init__(self, acks: Acks, tag: str, target: RealGuest, path: str) -> None:
        super().__init__(daemon=True)
        self.acks, self.tag, self.target, self.path = acks, tag, target, path
        self.stopping = threading.Event()
        self.relayed = -1
        self.steps = 0
        self.error: str | None = None

    def run(self) -> None:
        refused_since: float | None = None
        try:
            while not self.stopping.is_set():
                upto = self.acks.acked(self.tag)
                if upto <= self.relayed:
                    time.sleep(0.02)
                    continue
                try:
                    code, out = self.target.run("/bin/guestio", "mark", "relay", self.path,
                                                str(upto))
                except libvirt.libvirtError:
                    # the domain paused for a group: its agent is not asked meanwhile (a
                    # mark asked again is the same mark)
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since > 30:
                        raise
                    time.sleep(0.05)
                    continue
                refused_since = None
                if code != 0:
                    self.error = out
                    return
                self.relayed, self.steps = upto, self.steps + 1
        except Exception as exc:  # told by the test, not lost in a thread
            self.error = repr(exc)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)
        assert self.error is None, f"the relay failed: {self.error}"


def domain_state(guest: RealGuest) -> int:
    conn = libvirt.open(guest.uri)
    try:
        return int(conn.lookupByName(guest.name).state()[0])
    finally:
        conn.close()


SUSPENDED_GROUPS = 4
CRASH_ACROSS = 3  # the contrast: consistency=crash across the two domains


@dataclass
class Vm:
    """A guest with its two volumes under the pair writer."""

    guest: RealGuest
    acks: Acks
    a: str = ""
    b: str = ""
    tag: str = ""
    before: int = -1
    after: int = -1

    def start(self, setup: Rig) -> None:
        self.a, self.b = attach(setup, self.guest, self.acks), attach(setup, self.guest,
                                                                     self.acks)
        self.tag = start_pairs(self.guest, self.acks, self.a, self.b)


def test_two_vms_paused_together_are_one_point_in_time(
        rig: Callable[[str], Rig], guest: RealGuest, second_guest: RealGuest,
        scratch: Path) -> None:
    """``domains=[vm1, vm2], consistency=suspend``: one group of both VMs' volumes, taken
    while both are paused; each VM's pairs hold in it, and so does the dependency the host
    relays from VM1 to VM2. Both VMs write on after each group."""
    setup = rig("[libvirt]\nquiesce = never\n")
    api = setup.api
    first, second = vms = [Vm(guest, Acks(guest)), Vm(second_guest, Acks(second_guest))]
    for vm in vms:
        vm.start(setup)
    relay = Relay(first.acks, first.tag, second_guest, f"/data/{second.a}/relay")
    relay.start()
    paused: list[float] = []
    torn = 0
    try:
        deadline = time.monotonic() + 60
        while relay.steps < 3:
            assert relay.error is None and time.monotonic() < deadline, relay.error
            time.sleep(0.1)
        for number in range(SUSPENDED_GROUPS + CRASH_ACROSS):
            consistency = "suspend" if number < SUSPENDED_GROUPS else "crash"
            for vm in vms:
                vm.before = vm.acks.acked(vm.tag)
            group_id = api.create_group([], domains=[vm.guest.name for vm in vms],
                                        consistency=consistency)
            for vm in vms:  # both write on
                vm.after = vm.acks.moves(vm.tag, 1)
                assert domain_state(vm.guest) == libvirt.VIR_DOMAIN_RUNNING, vm.guest.name
            props = api.group(group_id)
            assert sorted(id_of(p) for p in props["Volumes"]) == \
                sorted(v for vm in vms for v in (vm.a, vm.b)), props
            assert len(props["Snapshots"]) == 4 and props["Consistency"] == consistency
            if consistency == "suspend":
                assert props["Paused"] > 0, props
                paused.append(props["Paused"])
            checks = check_group(api, group_id, {
                vm.tag: (vm.a, vm.b, vm.before, vm.after) for vm in vms}, scratch)
            relayed, holes = checks[second.a].files["relay"]
            marks = checks[first.b].files["pairs"][0]
            assert holes == 0, "a hole in the relayed marks"
            assert relayed >= 1, "nothing relayed before the group"
            if consistency == "suspend":
                assert relayed <= marks, \
                    f"VM2 holds the mark of pair {relayed - 1}, VM1 only {marks} pairs"
            else:
                torn += relayed > marks
            api.delete_group(group_id)
    finally:
        relay.stop()
    print(f"\ntwo VMs under consistency=suspend: paused {', '.join(f'{p:.3f}' for p in paused)}"
          f" s (longest {max(paused):.3f} s); {relay.relayed + 1} marks relayed in "
          f"{relay.steps} steps; consistency=crash across the VMs: {torn} of {CRASH_ACROSS} "
          "torn across")
    for vm in vms:
        detach_all(setup, vm.guest, vm.acks, [vm.a, vm.b], {vm.tag: (vm.a, vm.b)})


# ---- 3. the daemon killed at every named step ----------------------------------------------

def meta_of(api: Api, volume_id: str) -> tuple[Path, dict[str, Any]]:
    share = file_of(api, volume_id)[0].parent
    return share, json.loads((share / f"volume-{volume_id}.meta").read_text())


def settled(setup: Rig, volumes: list[str],
            guests: list[tuple[RealGuest, Acks, str]]) -> None:
    """Every volume without an operation or a problem, with exactly its chain's files;
    every group whole; every guest running, not frozen, writing."""
    api = setup.api
    for vid in volumes:
        props = api.volume(vid)
        assert props["Problems"] == [], (vid, props["Problems"])
        share, meta = meta_of(api, vid)
        assert meta.get("operation") is None, (vid, meta.get("operation"))
        images = sorted(p.name for p in share.iterdir()
                        if p.name == f"volume-{vid}" or (p.name.startswith(f"volume-{vid}.")
                                                         and p.suffix not in (".meta", ".info")))
        assert len(images) == len(props["Snapshots"]) + 1, \
            f"volume {vid}: files {images}, snapshots {props['Snapshots']}"
        assert not [p for p in share.iterdir() if p.name.startswith(f".volume-{vid}")]
    for group_id, group in api.groups().items():
        assert group["Problems"] == [], (group_id, group)
        assert len(group["Snapshots"]) == len(group["Volumes"]), (group_id, group)
    for vm, ack, tag in guests:
        assert domain_state(vm) == libvirt.VIR_DOMAIN_RUNNING, f"{vm.name} is not running"
        assert not vm.frozen(), f"{vm.name} was left frozen"
        ack.moves(tag)


# the step each point is in: before the switch a group is undone; once a domain runs on its
# overlays it is finished; recorded at ``switch`` but not yet switched, either is whole
CREATE_CRASHES: list[tuple[str, bool | None]] = [
    ("group-snapshot:intent", False), ("group-snapshot:overlays", False),
    ("live-create-snapshot:frozen", False), ("group-snapshot:paused", False),
    ("group-snapshot:switch", None), ("group-snapshot:switched", True),
    ("group-snapshot:member-info", True), ("group-snapshot:member-finished", True)]
DELETE_CRASHES = ["group-delete:marked", "group-delete:member",
                  *(f"live-delete-snapshot:{step}" for step in (
                      "intent", "job-started", "job-done", "pivot-recorded", "pivoted",
                      "gone-from-chain", "info")),
                  "delete-snapshot:commit", "delete-snapshot:remove-recorded"]


@pytest.fixture
def crash_rig(rig: Callable[[str], Rig],
              guest: RealGuest) -> Iterator[tuple[Rig, Acks, str, str, str, str]]:
    """A hostvold (quiesce=try) with two volumes of the guest under the pair writer and a
    detached third: (rig, acks, pair tag, a, b, c)."""
    setup = rig("[libvirt]\nquiesce = try\n")
    acks = Acks(guest)
    a, b = attach(setup, guest, acks), attach(setup, guest, acks)
    c = setup.cli.json("create", VOLUME_SIZE)["Id"]
    tag = start_pairs(guest, acks, a, b)
    yield setup, acks, tag, a, b, c


def test_a_group_create_killed_at_every_step_is_whole_or_absent(
        crash_rig: tuple[Rig, Acks, str, str, str, str], guest: RealGuest,
        scratch: Path) -> None:
    """Two live members (one domain, frozen and paused for the switch) and a detached
    one. Up to the switch the group is undone, from it on finished; the guest is never
    left frozen or paused, and a finished group's point in time holds the write order."""
    setup, acks, tag, a, b, c = crash_rig
    api = setup.api
    outcomes: list[str] = []
    for point, forward in CREATE_CRASHES:
        known = set(api.groups())
        snapshots = {v: sorted(api.volume(v)["Snapshots"]) for v in (a, b, c)}
        before = acks.acked(tag)
        setup.crash(point, lambda: api.start_group([c], domains=[guest.name],
                                                   consistency="suspend"))
        if point.rsplit(":", 1)[1] in ("paused", "switch", "switched"):
            assert domain_state(guest) == libvirt.VIR_DOMAIN_PAUSED, point
        elif point.endswith(":frozen"):
            assert guest.frozen(), point
        setup.restart()
        settled(setup, [a, b, c], [(guest, acks, tag)])
        made = set(api.groups()) - known
        assert len(made) == (1 if forward else 0) or (forward is None and len(made) <= 1), \
            (point, made)
        if made:
            group_id = made.pop()
            props = api.group(group_id)
            assert sorted(id_of(p) for p in props["Volumes"]) == sorted([a, b, c]), props
            check_group(api, group_id, {tag: (a, b, before, None)}, scratch)
            api.delete_group(group_id)
            outcomes.append(f"{point}: finished")
        else:
            assert {v: sorted(api.volume(v)["Snapshots"]) for v in (a, b, c)} == snapshots
            outcomes.append(f"{point}: undone")
    print("\n" + "; ".join(outcomes))
    detach_all(setup, guest, acks, [a, b], {tag: (a, b)})


def test_a_group_delete_killed_at_every_step_finishes(
        crash_rig: tuple[Rig, Acks, str, str, str, str], guest: RealGuest,
        scratch: Path) -> None:
    """A group of two live members (each deleted by active commit and pivot) and a
    detached one (deleted offline), the daemon killed at each step: after the restart the
    group is gone, every member's snapshot with it, and the guest's pairs are intact."""
    setup, acks, tag, a, b, c = crash_rig
    api = setup.api
    snapshots = {v: sorted(api.volume(v)["Snapshots"]) for v in (a, b, c)}
    for point in DELETE_CRASHES:
        group_id = api.create_group([c], domains=[guest.name])
        acks.moves(tag)
        setup.crash(point, lambda: api.start_group_delete(group_id))  # noqa: B023
        setup.restart()  # a job left READY is pivoted, the guest writing meanwhile
        settled(setup, [a, b, c], [(guest, acks, tag)])
        assert group_id not in api.groups(), point
        assert {v: sorted(api.volume(v)["Snapshots"]) for v in (a, b, c)} == snapshots, point
        last = acks.acked(tag)
        for vid in (a, b):
            code, out = guest.run("/bin/guestctl", "check", vid, "pairs")
            assert code == 0 and int(out.split()[1]) >= last + 1, (point, vid, out, last)
    assert "live by active-commit" in setup.log()
    print(f"\ngroup delete killed at {', '.join(DELETE_CRASHES)}: finished by the next start "
          "each time")
    before = acks.acked(tag)  # the volumes take a good group after all that
    group_id = api.create_group([c], domains=[guest.name])
    check_group(api, group_id, {tag: (a, b, before, acks.moves(tag, 1))}, scratch)
    api.delete_group(group_id)
    detach_all(setup, guest, acks, [a, b], {tag: (a, b)})


# ---- 4. a delete of members that need different strategies ---------------------------------

def test_a_group_delete_takes_each_member_its_own_way(
        rig: Callable[[str], Rig], guest: RealGuest, scratch: Path) -> None:
    """A group over a detached volume (deleted offline), a live one with a snapshot taken
    after the group (commit below the active file), a live one whose group overlay grew
    past the snapshot below it (pull) and a live one whose group overlay is its only
    layer above the base (active commit and pivot). After the delete every volume is
    consistent, the other points in time read as before and the guest lost nothing."""
    setup = rig("[libvirt]\nquiesce = try\n")
    api = setup.api
    acks = Acks(guest)
    offline = attach(setup, guest, acks)
    offline_last = acks.moves(offline)
    detach_all(setup, guest, acks, [offline])
    a, b, d = (attach(setup, guest, acks) for _ in range(3))
    tag = start_pairs(guest, acks, a, b)

    earlier_before = acks.acked(tag)
    earlier = api.snapshot(b)  # below the group's overlay on b
    acks.moves(tag)
    before = acks.acked(tag)
    group_id = api.create_group([offline, a, b, d])
    after = acks.moves(tag, 1)
    assert api.group(group_id)["Quiesced"] is True  # quiesce = try, the agent answers
    later_before = acks.acked(tag)
    later = api.snapshot(a)  # above the group's overlay on a
    later_after = acks.moves(tag, 1)
    code, out = guest.run("/bin/guestctl", "fill", b, "6")  # b's group overlay outgrows
    assert code == 0, out
    acks.moves(tag)
    check_group(api, group_id, {tag: (a, b, before, after)}, scratch)

    sids = {id_of(p) for p in api.group(group_id)["Snapshots"]}
    member = {vid: next(id_of(p) for p in api.volume(vid)["Snapshots"] if id_of(p) in sids)
              for vid in (offline, a, b, d)}
    api.delete_group(group_id)
    assert group_id not in api.groups()
    log = setup.log()
    for vid, how in ((a, "commit"), (b, "pull"), (d, "active-commit")):
        assert f"deleting snapshot {member[vid]} of volume {vid} live by {how}" in log, \
            f"the group's snapshot of {vid} was not deleted live by {how}"
    assert f"deleting snapshot {member[offline]} of volume {offline} live" not in log
    expected = {offline: [], a: [later], b: [earlier], d: []}
    for vid, remaining in expected.items():
        props = api.volume(vid)
        assert props["Problems"] == [], (vid, props["Problems"])
        assert [id_of(p) for p in props["Snapshots"]] == remaining, (vid, props["Snapshots"])
    acks.moves(tag)
    for vid in (a, d):
        acks.moves(vid)

    for sid, (low, high) in ((earlier, (earlier_before, None)), (later, (later_before,
                                                                          later_after))):
        copy = api.snapshot_copy(sid)  # the other points in time read as before
        vid = b if sid == earlier else a
        fs = read_copy(api, copy, scratch, replay=False)
        count = fs.files["pairs"][0]
        assert count >= low + 1 and (high is None or count <= high + 3), (vid, count, low, high)
        api.delete_volume(copy)
    path, fmt = file_of(api, offline)  # detached: read from its own file
    fs = check_image(path, fmt, scratch)
    assert fs.fsck_clean and not fs.needed_recovery and fs.stray == 0
    assert fs.records >= offline_last + 1
    detach_all(setup, guest, acks, [a, b, d], {tag: (a, b)})


# ---- the domain destroyed in the middle of a group create (last: the guest dies) ------------

def destroy(guest: RealGuest) -> None:
    conn = libvirt.open(guest.uri)
    try:
        conn.lookupByName(guest.name).destroy()
    finally:
        conn.close()


def test_a_group_whose_domain_was_destroyed_mid_create_is_whole_or_absent(
        rig: Callable[[str], Rig], guest: RealGuest, second_guest: RealGuest,
        scratch: Path) -> None:
    """The daemon dies in a group create and the domain is destroyed before it starts
    again: at ``switch`` (a suspend group, the domain paused, its disks not switched yet)
    and at ``switched`` (a crash-consistent group, the guest writing into its overlays).
    The next start finishes or undoes each group, offline, as a whole; the group's point
    in time and the volumes' own files hold every acknowledged pair in write order."""
    setup = rig("[libvirt]\nquiesce = never\n")
    api = setup.api
    cases = [(Vm(guest, Acks(guest)), "group-snapshot:switch", "suspend"),
             (Vm(second_guest, Acks(second_guest)), "group-snapshot:switched", "crash")]
    for vm, _, _ in cases:
        vm.start(setup)
    outcomes = []
    for vm, point, consistency in cases:
        known = set(api.groups())
        before = vm.acks.acked(vm.tag)
        setup.crash(point, lambda: api.start_group(
            [], domains=[vm.guest.name], consistency=consistency))  # noqa: B023
        if consistency == "suspend":
            assert domain_state(vm.guest) == libvirt.VIR_DOMAIN_PAUSED
        else:
            vm.acks.moves(vm.tag)  # into the group's overlays
        destroy(vm.guest)
        last = vm.acks.acked(vm.tag)
        setup.restart()
        settled(setup, [vm.a, vm.b], [])
        for vid in (vm.a, vm.b):
            assert api.volume(vid)["State"] == "available", vid
        made = set(api.groups()) - known
        assert len(made) <= 1, made
        group_id = made.pop() if made else None
        if group_id is not None:
            props = api.group(group_id)
            assert sorted(id_of(p) for p in props["Volumes"]) == sorted([vm.a, vm.b]), props
            check_group(api, group_id, {vm.tag: (vm.a, vm.b, before, None)}, scratch)
        else:
            assert all(api.volume(v)["Snapshots"] == [] for v in (vm.a, vm.b))
        now = {vid: check_image(*file_of(api, vid), scratch, replay=True, files=("pairs",))
               for vid in (vm.a, vm.b)}
        pairs_hold(Pairs(now[vm.a].files["pairs"][0], now[vm.b].files["pairs"][0]), last)
        if group_id is not None:
            api.delete_group(group_id)
            settled(setup, [vm.a, vm.b], [])
        outcomes.append(f"{point}, domain destroyed: {'finished' if group_id else 'undone'}")
    print("\n" + "; ".join(outcomes))
