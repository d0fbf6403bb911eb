"""P13: a group snapshot of the 8 disks of one domain vs one disk's snapshot, same domain,
same run (SPEC sections 5a and 15; target at most 1.3x).

    python -m bench.group_snapshot [--rounds 9] [--disks 8]

Builds the rig of ``bench/live_rig.py`` (libvirtd, a diskless TCG domain with a virtio-scsi
controller, a private dbus-daemon, a hostvold on a loop-mounted ext4 share, ``quiesce =
never``), attaches 8 hostvold volumes to the domain and, beside them, 8 plain raw files
hostvold does not manage (the floor's disks, on the same share). Then, after one warm-up
round, each round measures, in a rotating order:

(a) ``Volume.CreateSnapshot`` of one attached volume (a synchronous call: call to reply);
(b) ``Manager.CreateGroupSnapshot`` with the ``domain`` option (all 8 volumes), call to the
    Job's ``Completed`` signal;
(c) the floor: libvirt's own ``snapshotCreateXML`` of the 8 floor disks in one call
    (disk-only, no metadata, atomic, reuse-ext) on overlays made before by ``qemu-img
    create -u``: the call alone. Also shown: the same with the 8 ``qemu-img create -u``
    (in parallel) inside the time, with libvirt making the overlays itself, and the call
    alone for one disk (how libvirt's own time grows from one disk to 8);
(d) the naive way: 8 ``Volume.CreateSnapshot`` calls one after another.

All calls go over one long-lived D-Bus connection. Every snapshot is deleted between rounds
(untimed, through hostvold), and the floor's disks are put back on fresh raw files, so no
chain grows. Medians in ms, the ratios group/single (P13), group/floor and naive/group, a
line of JSON, and as the last line the P13 summary (``bench/run_all.py``).

Exit status 77 with one line on stderr when this host cannot run it (as ``live_rig``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from bench.live_rig import (
    CANNOT_RUN,
    DOMAIN_XML,
    URI,
    CannotRun,
    Rig,
    ensure_libvirtd,
    hostvolctl,
    needs,
)
from hostvold.server.bus import object_path
from hostvold.virt.guest import disk_xml, parse_disks, snapshot_xml

TARGET = 1.3
SIZE = "8M"


class Bus:
    """One connection to the rig's hostvold, with every Job's ``Completed`` signal seen."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.done: dict[str, tuple[bool, str, str]] = {}
        self.waiting: dict[str, asyncio.Future[tuple[bool, str, str]]] = {}

    async def connect(self) -> None:
        self.bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        self.bus.add_message_handler(self._on_message)
        await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                        ["type='signal',interface='org.hostvold1.Job',member='Completed'"],
                        destination="org.freedesktop.DBus")

    def _on_message(self, message: Any) -> None:
        if message.member == "Completed" and message.interface == "org.hostvold1.Job":
            outcome = (bool(message.body[0]), str(message.body[1]), str(message.body[2]))
            self.done[str(message.path)] = outcome
            future = self.waiting.pop(str(message.path), None)
            if future is not None and not future.done():
                future.set_result(outcome)

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None,
                   destination: str = "org.hostvold1") -> list[Any]:
        reply = await self.bus.call(Message(destination=destination, path=path,
                                            interface=interface, member=member,
                                            signature=signature, body=body or []))
        assert reply is not None
        if reply.message_type != MessageType.METHOD_RETURN:
            raise SystemExit(f"{interface}.{member} on {path}: {reply.error_name}: "
                             f"{reply.body[0] if reply.body else ''}")
        return list(reply.body)

    async def wait_job(self, job: str, timeout: float = 300) -> None:
        """Until the job's ``Completed`` signal (it may have come already)."""
        if job not in self.done:
            future = self.waiting.setdefault(job, asyncio.get_running_loop().create_future())
            await asyncio.wait_for(future, timeout)
        success, error, message = self.done.pop(job)
        if not success:
            raise SystemExit(f"job {job} failed: {error}: {message}")

    async def job_objects(self, job: str) -> list[str]:
        (value,) = await self.call(job, "org.freedesktop.DBus.Properties", "Get", "ss",
                                   ["org.hostvold1.Job", "Objects"])
        assert isinstance(value, Variant)
        return [str(path) for path in value.value]

    async def snapshot(self, volume_path: str) -> str:
        (snapshot,) = await self.call(volume_path, "org.hostvold1.Volume", "CreateSnapshot",
                                      "a{sv}", [{}])
        return str(snapshot)

    async def group(self, domain: str) -> str:
        """The job of a group snapshot of every hostvold volume of ``domain``."""
        (job,) = await self.call("/org/hostvold1", "org.hostvold1.Manager",
                                 "CreateGroupSnapshot", "aoa{sv}",
                                 [[], {"domain": Variant("s", domain)}])
        return str(job)

    async def delete(self, path: str, interface: str) -> None:
        (job,) = await self.call(path, interface, "Delete", "a{sv}", [{}])
        await self.wait_job(str(job))


class Floor:
    """Plain raw files on the domain, switched by libvirt itself (no hostvold)."""

    def __init__(self, domain: Any, scratch: Path, targets: list[str]) -> None:
        self.domain = domain
        self.scratch = scratch
        self.targets = targets
        self.made = 0
        self.sources: dict[str, Path] = {}

    def _fresh(self, target: str) -> Path:
        self.made += 1
        base = self.scratch / f"base-{target}-{self.made}.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), SIZE], check=True)
        base.chmod(0o666)
        return base

    def attach(self) -> None:
        for target in self.targets:
            self.sources[target] = self._fresh(target)
            self.domain.attachDeviceFlags(
                disk_xml(str(self.sources[target]), "raw", target, f"floor-{target}"), 0)

    def reset(self) -> None:
        """Each floor disk back on a fresh raw file, so the chain does not grow."""
        live = {d.target: d for d in parse_disks(self.domain.XMLDesc(0))}
        for target in self.targets:
            disk = live[target]
            self.domain.detachDeviceFlags(
                disk_xml(disk.source or "", disk.format or "raw", target, f"floor-{target}"), 0)
        for path in self.scratch.iterdir():
            path.unlink()
        self.attach()

    def others(self) -> list[str]:
        """The domain's disks that are not the floor's."""
        return [d.target for d in parse_disks(self.domain.XMLDesc(0))
                if d.target not in self.targets]

    async def switch(self, targets: list[str], overlays_by: str) -> float:
        """Seconds for libvirt to switch ``targets`` to new overlays in one
        snapshotCreateXML (disk-only, no metadata, atomic). ``overlays_by``: ``ahead``
        (made by qemu-img before, untimed; reuse-ext), ``qemu-img`` (made by parallel
        ``qemu-img create -u`` inside the time; reuse-ext) or ``libvirt`` (made by it)."""
        others = self.others() + [t for t in self.targets if t not in targets]
        suffix = ".made.qcow2" if overlays_by == "libvirt" else ".qcow2"
        overlays = {t: str(self.sources[t].with_suffix(suffix)) for t in targets}
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
        if overlays_by != "libvirt":
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        if overlays_by == "ahead":
            await self._overlays(overlays)
        start = time.perf_counter()
        if overlays_by == "qemu-img":
            await self._overlays(overlays)
        self.domain.snapshotCreateXML(snapshot_xml(overlays, others), flags)
        elapsed = time.perf_counter() - start
        self.reset()
        return elapsed

    async def _overlays(self, overlays: dict[str, str]) -> None:
        made = [await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b",
            str(self.sources[t]), path, SIZE) for t, path in overlays.items()]
        if any([await proc.wait() for proc in made]):
            raise SystemExit("qemu-img create of a floor overlay failed")


def domain(rig: Rig) -> str:
    """The rig's domain with four virtio-scsi controllers: libvirt puts a target ``sdX``
    on controller (X's index) // 7, and cannot hot-plug a missing controller on this
    machine type, so 17 disks (sdb..sdr) need controllers 0 to 2, and a spare."""
    controllers = "".join(f"<controller type='scsi' index='{i}' model='virtio-scsi'/>"
                          for i in range(4))
    xml = DOMAIN_XML.replace("<controller type='scsi' index='0' model='virtio-scsi'/>",
                             controllers)
    assert controllers in xml
    conn = libvirt.open(URI)
    name = f"hostvold-bench-group-{os.getpid()}"
    try:
        dom = conn.createXML(xml.format(name=name), 0)
    except libvirt.libvirtError as exc:
        conn.close()
        raise CannotRun(f"no TCG domain can start here: {exc}") from None
    rig.undo.append(("domain", (conn, dom)))
    return name


def setup(address: str, domain: str, disks: int) -> tuple[list[str], Path]:
    """``disks`` hostvold volumes attached to ``domain``; their share's mount point."""
    volumes = []
    for _ in range(disks):
        volume = str(hostvolctl(address, "create", SIZE)["Id"])
        hostvolctl(address, "attach", volume, domain)
        volumes.append(volume)
    share = Path(str(hostvolctl(address, "connection-info", volumes[0])["mount_point"]))
    return volumes, share


async def measure(address: str, domain_name: str, volumes: list[str], share: Path,
                  rounds: int) -> dict[str, Any]:
    conn = libvirt.open(URI)
    domain = conn.lookupByName(domain_name)
    used = {d.target for d in parse_disks(domain.XMLDesc(0))}
    free = [f"sd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"sd{c}" not in used]
    if len(free) < len(volumes):
        raise SystemExit(f"no {len(volumes)} free disk targets left on {domain_name}")
    scratch = share / f"floor-{time.monotonic_ns()}"
    scratch.mkdir(mode=0o755)
    floor = Floor(domain, scratch, free[:len(volumes)])
    floor.attach()
    bus = Bus(address)
    await bus.connect()
    paths = [object_path("volumes", v) for v in volumes]
    times: dict[str, list[float]] = {key: [] for key in (
        "single", "group", "naive", "floor", "floor_qemu_img", "floor_libvirt", "floor_one")}

    async def single() -> None:
        start = time.perf_counter()
        snapshot = await bus.snapshot(paths[0])
        times["single"].append(time.perf_counter() - start)
        await bus.delete(snapshot, "org.hostvold1.Snapshot")

    async def group() -> None:
        start = time.perf_counter()
        job = await bus.group(domain_name)
        await bus.wait_job(job)
        times["group"].append(time.perf_counter() - start)
        group_path = (await bus.job_objects(job))[-1]
        if "/groups/" not in group_path:
            raise SystemExit(f"the group job's objects end with {group_path}, not a group")
        await bus.delete(group_path, "org.hostvold1.GroupSnapshot")

    async def naive() -> None:
        start = time.perf_counter()
        made = [await bus.snapshot(path) for path in paths]
        times["naive"].append(time.perf_counter() - start)
        await asyncio.gather(*(bus.delete(s, "org.hostvold1.Snapshot") for s in made))

    async def bare() -> None:
        times["floor"].append(await floor.switch(floor.targets, "ahead"))
        times["floor_qemu_img"].append(await floor.switch(floor.targets, "qemu-img"))
        times["floor_libvirt"].append(await floor.switch(floor.targets, "libvirt"))
        times["floor_one"].append(await floor.switch(floor.targets[:1], "ahead"))

    steps: list[Callable[[], Awaitable[None]]] = [single, group, bare, naive]
    try:
        for step in steps:  # warm-up, not counted
            await step()
        for key in times:
            times[key].clear()
        for round_number in range(rounds):
            turn = round_number % len(steps)
            for step in steps[turn:] + steps[:turn]:
                await step()
    finally:
        bus.bus.disconnect()
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)  # the domain goes with the rig
    medians = {key: statistics.median(values) * 1000 for key, values in times.items()}
    return {"disks": len(volumes), "rounds": rounds,
            **{f"{key}_ms": round(value, 2) for key, value in medians.items()},
            "group_vs_single": medians["group"] / medians["single"],
            "group_vs_floor": medians["group"] / medians["floor"],
            "naive_vs_group": medians["naive"] / medians["group"],
            "floor_vs_floor_one": medians["floor"] / medians["floor_one"],
            "all_ms": {key: [round(v * 1000, 1) for v in values]
                       for key, values in times.items()}}


def report(figures: dict[str, Any]) -> list[str]:
    n, rounds = figures["disks"], figures["rounds"]
    ratio = round(figures["group_vs_single"], 2)
    return [
        f"medians of {rounds} rounds (ms): one disk's snapshot (Volume.CreateSnapshot) "
        f"{figures['single_ms']:.1f}; group snapshot of {n} disks (call to Completed) "
        f"{figures['group_ms']:.1f}; {n} snapshots one after another {figures['naive_ms']:.1f}",
        f"floor, libvirt's own snapshotCreateXML of {n} disks in one call (disk-only, "
        f"no metadata, atomic): {figures['floor_ms']:.1f} on overlays made before (the call "
        f"alone); {figures['floor_qemu_img_ms']:.1f} with {n} parallel qemu-img create -u "
        f"inside the time; {figures['floor_libvirt_ms']:.1f} with libvirt making them; "
        f"the call alone for one disk {figures['floor_one_ms']:.1f}",
        f"group/single {figures['group_vs_single']:.2f}x (target <= {TARGET}x); "
        f"group/floor {figures['group_vs_floor']:.2f}x; "
        f"naive/group {figures['naive_vs_group']:.2f}x; libvirt's own, {n} disks vs one: "
        f"{figures['floor_vs_floor_one']:.2f}x",
        json.dumps(figures),
        f"P13: group snapshot of a domain's {n} disks vs one disk's snapshot = {ratio:.2f}x "
        f"(target <= {TARGET}x): {'met' if ratio <= TARGET else 'missed'}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--disks", type=int, default=8)
    args = parser.parse_args()
    if not 1 <= args.disks <= 12:
        parser.error("--disks: 1 to 12 (twice that many targets sdb..sdz on one domain)")
    try:
        needs()
        ensure_libvirtd()
        rig = Rig()
        try:
            rig.shared_mount_base()
            name = domain(rig)
            address = rig.bus()
            rig.daemon(address)
            volumes, share = setup(address, name, args.disks)
            figures = asyncio.run(measure(address, name, volumes, share, args.rounds))
        finally:
            rig.close()
    except CannotRun as exc:
        print(exc, file=sys.stderr)
        return CANNOT_RUN
    print("\n".join(report(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
