"""P3: online snapshot delete of a snapshot holding N MiB of changes, hostvold over D-Bus
against the bare libvirt call ``virsh blockcommit`` makes, on identical chains attached to
the same running TCG domain, side by side in one run.

    python -m bench.live_delete [--changes-mib 1024] [--rounds 1]

Two shapes, each built offline and then attached:
- below: base <- O1 (the changes) <- O2 (active, empty); the snapshot whose data is the
  base is deleted: O1 is committed into the base, by hostvold (``blockCommit``) and bare
  (``blockCommit(top=O1, base=base)``, what ``virsh blockcommit --top --base --wait`` does).
  The same bytes move: the time ratio is hostvold's overhead.
- active: base (16 MiB of data) <- O (active, the changes); the snapshot is deleted while its
  overlay is the active file. The bare way (``virsh blockcommit --active --pivot``, as
  Proxmox) commits the changes down; Nova always pulls the base up. hostvold picks the
  direction that moves fewer bytes from the allocated sizes.
Each round runs both sides on fresh chains, in turn first (the order alternates). Time is
from the call to the end: hostvold's Job ``Completed`` signal; for the bare calls libvirt's
``COMPLETED`` event (after the pivot for an active commit) and, timed on in the same call,
an fsync of the file the data went into. SPEC section 15 measures P3 against the bare call
*with* that fsync (the durable floor: a delete must make the base durable before it removes
the overlay), target <= 1.1x; the ratio against the bare call alone is printed beside it.
Builds its own domain, bus, daemon and share with ``bench.live_rig``; as root. The last lines
are the P3 summaries (bench/run_all.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
BASE_DATA = 16 * MiB
P3_TARGET = 1.1  # SPEC section 15, against the bare call + an fsync of the base


def qemu_img(*argv: str) -> None:
    subprocess.run(["qemu-img", *argv], check=True, capture_output=True)


def write(path: Path, fmt: str, size: int, pattern: int) -> None:
    step = 256 * MiB  # one request stays under 2 GiB
    commands = [f"write -P {pattern} {offset} {min(step, size - offset)}"
                for offset in range(0, size, step)]
    subprocess.run(["qemu-io", "-f", fmt, *(w for c in commands for w in ("-c", c)),
                    str(path)], check=True, capture_output=True)


def settle() -> None:
    """The same start for every timed run: nothing dirty waiting to be written back, nothing
    of the chains in the page cache (the first job would otherwise pay for the writes of the
    set-up, the second read from memory)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class Timer:
    """Libvirt block-job events and hostvold's Completed signals, timestamped as they come."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[float, int]]] = {}
        self.completed: dict[str, float] = {}
        self.arrived = asyncio.Event()

    def event(self, disk: str, status: int) -> None:
        self.events.setdefault(disk, []).append((time.monotonic(), status))
        self.arrived.set()

    def job_completed(self, job: str) -> None:
        self.completed[job] = time.monotonic()
        self.arrived.set()

    async def _until(self, found: Callable[[], float | None]) -> float:
        while (when := found()) is None:
            self.arrived.clear()
            await self.arrived.wait()
        return when

    async def wait_event(self, disk: str, status: int, since: float) -> float:
        return await self._until(lambda: next(
            (t for t, s in self.events.get(disk, []) if s == status and t >= since), None))

    async def wait_completed(self, job: str) -> float:
        return await self._until(lambda: self.completed.get(job))


def strategy_of(log: Path, snapshot: str) -> str:
    """The direction hostvold chose for a delete, from its own log line."""
    found = re.search(rf"deleting snapshot {snapshot} of volume \S+ live by (\S+)",
                      log.read_text())
    assert found, f"no delete of {snapshot} in {log}"
    return found.group(1)


async def run(args: argparse.Namespace, address: str, domain_name: str,
              log: Path) -> dict[str, dict[str, float]]:
    import libvirt
    import libvirtaio
    from dbus_fast import BusType, Message
    from dbus_fast.aio import MessageBus

    from bench.live_latency import dbus_call
    from hostvold.server.bus import object_path
    from hostvold.virt.guest import Guest, disk_xml, parse_disks
    from hostvold.virt.hypervisor import Hypervisor

    loop = asyncio.get_running_loop()
    libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    conn = libvirt.open("qemu:///system")
    domain = conn.lookupByName(domain_name)
    hypervisor = Hypervisor("qemu:///system")
    hypervisor.conn = conn
    guest = Guest(hypervisor, domain)
    timer = Timer()

    def on_block_job(c: Any, dom: Any, disk: str, job_type: int, status: int, o: Any) -> None:
        timer.event(Path(disk).name, status)

    conn.domainEventRegisterAny(domain, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                                on_block_job, None)
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()

    def on_signal(message: Message) -> None:
        if message.member == "Completed":
            timer.job_completed(str(message.path))

    bus.add_message_handler(on_signal)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',member='Completed'"]))

    async def hostvold_delete(snapshot: str, volume: str) -> tuple[float, float]:
        """Seconds to the Job's Completed and to libvirt's COMPLETED event of the job."""
        disk = next(d.target for d in parse_disks(domain.XMLDesc(0)) if d.serial == volume)
        start = time.monotonic()
        (job,) = await dbus_call(bus, object_path("snapshots", snapshot),
                                 "org.hostvold1.Snapshot", "Delete", "a{sv}", [{}])
        done = await timer.wait_completed(str(job))
        event = await timer.wait_event(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, start)
        return done - start, event - start

    async def attach_scratch(top: Path) -> str:
        used = {d.target for d in parse_disks(domain.XMLDesc(0))}
        target = next(f"sd{c}" for c in "bcdefghijk" if f"sd{c}" not in used)
        await guest.attach_disk(disk_xml(str(top), "qcow2", target, "scratch"))
        return target

    async def bare_delete(shape: str, target: str, directory: Path, into: Path,
                          active: Path) -> tuple[float, float, Path]:
        """The bare libvirt call: (seconds to its COMPLETED event, the same until the data
        is durable, the file the disk runs on after it)."""
        start = time.monotonic()
        if shape == "below":  # virsh blockcommit --top o1 --base base --wait
            domain.blockCommit(target, str(into), str(directory / "o1.qcow2"), 0,
                               libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
            after = active
        else:  # virsh blockcommit --active --pivot
            domain.blockCommit(target, None, None, 0,
                               libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
                               | libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
            await timer.wait_event(target, libvirt.VIR_DOMAIN_BLOCK_JOB_READY, start)
            domain.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            after = into
        end = await timer.wait_event(target, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, start)
        # QEMU wrote with cache=none, yet the share's storage may hold the data in a
        # volatile cache: an fsync of the file it went into, as hostvold's first durable
        # write after the job makes the same flush
        fd = os.open(into, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return end - start, time.monotonic() - start, after

    def bare_chain(shape: str) -> tuple[Path, Path, Path]:
        """The same chain as the volume's, in files hostvold does not manage:
        (directory, the file the commit goes into, the active file)."""
        directory = scratch / f"{shape}-{time.monotonic_ns()}"
        directory.mkdir(mode=0o755)
        qemu_img("create", "-f", "raw", str(directory / "base.raw"), str(args.size))
        backing = "base.raw"
        for name in ("o1.qcow2", "o2.qcow2"):
            qemu_img("create", "-f", "qcow2", "-b", backing, "-F",
                     "raw" if backing == "base.raw" else "qcow2", str(directory / name),
                     str(args.size))
            backing = name
        if shape == "below":  # the changes in O1, committed into the base
            write(directory / "o1.qcow2", "qcow2", args.changes, 0x5A)
            return directory, directory / "base.raw", directory / "o2.qcow2"
        write(directory / "o1.qcow2", "qcow2", BASE_DATA, 0x11)
        write(directory / "o2.qcow2", "qcow2", args.changes, 0x5A)
        return directory, directory / "o1.qcow2", directory / "o2.qcow2"

    results: dict[str, dict[str, float]] = {}
    for shape in ("below", "active"):
        rows: dict[str, list[float]] = {"hostvold": [], "hostvold event": [], "bare": [],
                                        "bare+sync": []}
        moved: list[float] = []
        for round_number in range(args.rounds):
            info = await asyncio.to_thread(prepare, address, domain_name, args, shape)
            # the bare chains on the volumes' own filesystem: the same disk under both
            scratch = Path(info["share"]) / "bare-chains"
            scratch.mkdir(mode=0o755, exist_ok=True)
            directory, into, active = bare_chain(shape)
            target = await attach_scratch(active)
            # who goes first changes every round: neither side always meets the disk's
            # writeback of the other's gigabyte
            order = ("hostvold", "bare") if round_number % 2 == 0 else ("bare", "hostvold")
            for side in order:
                await asyncio.to_thread(settle)  # off the loop: libvirt keep-alives go on
                if side == "hostvold":
                    total, event = await hostvold_delete(info["snapshot"], info["volume"])
                    rows["hostvold"].append(total)
                    rows["hostvold event"].append(event)
                    strategy = strategy_of(log, info["snapshot"])
                    moved.append(info["pull"] if strategy == "pull" else info["commit"])
                else:
                    bare, synced, after = await bare_delete(shape, target, directory, into,
                                                            active)
                    rows["bare"].append(bare)
                    rows["bare+sync"].append(synced)
            print(f"{shape}, round {round_number + 1} ({order[0]} first): hostvold "
                  f"{rows['hostvold'][-1] * 1000:.0f} ms (libvirt's event at "
                  f"{rows['hostvold event'][-1] * 1000:.0f} ms), bare {rows['bare'][-1] * 1000:.0f}"
                  f" ms, bare + fsync {rows['bare+sync'][-1] * 1000:.0f} ms", flush=True)
            await guest.detach_disk(disk_xml(str(after), "qcow2", target, "scratch"))
            shutil.rmtree(directory, ignore_errors=True)
            await asyncio.to_thread(remove, address, info["volume"])
        results[shape] = {"hostvold": statistics.median(rows["hostvold"]),
                          "hostvold event": statistics.median(rows["hostvold event"]),
                          "bare": statistics.median(rows["bare"]),
                          "bare+sync": statistics.median(rows["bare+sync"]),
                          "moved": max(moved), "commit": info["commit"], "pull": info["pull"]}
    bus.disconnect()
    conn.close()
    return results


def prepare(address: str, domain: str, args: argparse.Namespace,
            shape: str) -> dict[str, Any]:
    """One volume of ``shape``, built offline through hostvold, then attached."""
    from bench.live_rig import hostvolctl

    volume = str(hostvolctl(address, "create", "--format", "raw", str(args.size))["Id"])

    def active_file() -> Path:
        return Path(str(hostvolctl(address, "connection-info", volume)["path"]))

    if shape == "below":
        target = str(hostvolctl(address, "snapshot", "create", volume)["Id"])
        write(active_file(), "qcow2", args.changes, 0x5A)
        hostvolctl(address, "snapshot", "create", volume)
        commit = pull = float(args.changes)
    else:  # the snapshot's data (O1) is not the volume's base file: both ways open
        hostvolctl(address, "snapshot", "create", volume)
        write(active_file(), "qcow2", BASE_DATA, 0x11)
        below = active_file()
        target = str(hostvolctl(address, "snapshot", "create", volume)["Id"])
        write(active_file(), "qcow2", args.changes, 0x5A)
        commit, pull = float(allocated(active_file())), float(allocated(below))
    hostvolctl(address, "attach", volume, domain)
    return {"volume": volume, "snapshot": target, "commit": commit, "pull": pull,
            "share": str(hostvolctl(address, "connection-info", volume)["mount_point"])}


def remove(address: str, volume: str) -> None:
    """Detached and deleted: the domain's disk bus holds only so many."""
    from bench.live_rig import hostvolctl

    hostvolctl(address, "detach", volume)
    hostvolctl(address, "delete", volume)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    args.changes = args.changes_mib * MiB
    args.size = args.changes + 64 * MiB
    from bench.live_rig import CANNOT_RUN, CannotRun, running

    try:
        with running(share_mib=6 * args.changes_mib + 1024) as (rig, domain, address):
            results = asyncio.run(run(args, address, domain, rig.root / "daemon" / "hostvold.log"))
    except CannotRun as exc:
        print(exc, file=sys.stderr)
        return CANNOT_RUN
    print(json.dumps(results))
    below, active = results["below"], results["active"]
    print(f"snapshot below the active file, {args.changes_mib} MiB committed: hostvold "
          f"{below['hostvold'] * 1000:.0f} ms, bare blockCommit {below['bare'] * 1000:.0f} ms, "
          f"bare blockCommit then an fsync of the base {below['bare+sync'] * 1000:.0f} ms "
          "(the floor: hostvold makes the base durable before it removes the overlay)")
    print(f"where hostvold's time goes: libvirt's COMPLETED event after "
          f"{below['hostvold event'] * 1000:.0f} ms (bare {below['bare'] * 1000:.0f} ms), "
          f"then {(below['hostvold'] - below['hostvold event']) * 1000:.0f} ms to the Job's "
          f"Completed, nearly all of it the flush of the committed data by its first durable "
          f"write (bare: the fsync took {(below['bare+sync'] - below['bare']) * 1000:.0f} ms)")
    plain = (below["hostvold"] / below["bare"], active["hostvold"] / active["bare"])
    print(f"against the bare call alone (no fsync: the data may not be durable yet): "
          f"{plain[0]:.2f}x below the active file, {plain[1]:.2f}x with the changes in it")
    print(f"snapshot whose overlay is active: the changes {active['commit'] / MiB:.0f} MiB, "
          f"the snapshot's data {active['pull'] / MiB:.0f} MiB allocated; hostvold moved "
          f"{active['moved'] / MiB:.0f} MiB in {active['hostvold'] * 1000:.0f} ms, bare "
          f"active commit + pivot {active['commit'] / MiB:.0f} MiB in "
          f"{active['bare'] * 1000:.0f} ms, then an fsync of its base "
          f"{active['bare+sync'] * 1000:.0f} ms")
    ratio = round(below["hostvold"] / below["bare+sync"], 2)
    print(f"P3: delete of a snapshot holding {args.changes_mib} MiB below the active file, "
          f"hostvold vs bare blockCommit + fsync of the base = {ratio:.2f}x "
          f"(target <= {P3_TARGET}x): {'met' if ratio <= P3_TARGET else 'missed'}")
    ratio = round(active["hostvold"] / active["bare+sync"], 2)
    print(f"P3: same with the changes in the active file, hostvold (moves "
          f"{active['moved'] / MiB:.0f} MiB) vs bare active commit + pivot + fsync of the base "
          f"(moves {active['commit'] / MiB:.0f} MiB) = {ratio:.2f}x "
          f"(target <= {P3_TARGET}x): {'met' if ratio <= P3_TARGET else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
