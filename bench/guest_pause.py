"""P12: the longest stall the guest's own I/O sees, hostvold against libvirt's own commands.

    python -m bench.guest_pause [--rounds 5]        (root)

Boots the real test guest (``tests/guest``: Linux, ext4, qemu-ga, a writer and a latency
probe on every disk) and gives it three volumes of one size on loop-mounted ext4 shares:
- H, of a hostvold with ``quiesce = never``; Q, of a second hostvold with ``quiesce = try``
  (the agent answers, so it freezes);
- V, on the same kind of share, driven by libvirt's own commands only.

Each round, sides alternating which goes first, measures the longest gap between two
completions of the guest's probe on the disk being worked on:
- snapshot create: hostvold's ``Volume.CreateSnapshot`` on H vs ``virsh snapshot-create-as
  --disk-only --atomic --no-metadata`` on V; with quiesce: Q vs the same plus ``--quiesce``;
- active commit + pivot: ``Snapshot.Delete`` of H's newest snapshot until its Job's
  ``Completed`` (hostvold commits it down: the layer below holds the filesystem) vs
  ``virsh blockcommit --active --pivot`` on V.

hostvold is called over D-Bus from this process, as an orchestrator's long-lived client
would; a ``hostvolctl`` process would add a Python start (some 200 ms of CPU) to each call,
and under TCG every CPU the host spends elsewhere is taken from the guest's single vCPU.

The floor is the guest's own longest gap over a quiet second with nothing done. The
figures are medians over the rounds; each ratio is hostvold's over libvirt's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import libvirt
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from bench.live_rig import CANNOT_RUN, CannotRun, Rig, ensure_libvirtd, hostvolctl, needs
from hostvold.server.bus import object_path
from tests.guest.image import BuildFailed, ensure_image
from tests.guest.vm import RealGuest, boot

TARGET = 1.2


def virsh(*args: str) -> str:
    done = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def target_of(domain: str, serial: str) -> str:
    import xml.etree.ElementTree as ET
    for disk in ET.fromstring(virsh("dumpxml", domain)).iter("disk"):
        if disk.findtext("serial") == serial:
            target = disk.find("target")
            assert target is not None
            return str(target.get("dev"))
    raise SystemExit(f"no disk with serial {serial}")


class BusClient:
    """hostvold over D-Bus from this process: an event loop in a thread of its own."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.done: dict[str, asyncio.Future[bool]] = {}
        self.bus: MessageBus = self._run(self._connect(address))

    def _run(self, work: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(600)

    async def _connect(self, address: str) -> MessageBus:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        bus.add_message_handler(self._on_signal)
        await self._call(bus, "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                         "s", ["type='signal',interface='org.hostvold1.Job',"
                               "member='Completed'"], "org.freedesktop.DBus")
        return bus

    def _on_signal(self, message: Message) -> None:
        if message.member == "Completed":
            self._future(str(message.path)).set_result(bool(message.body[0]))

    def _future(self, job: str) -> asyncio.Future[bool]:
        if job not in self.done or self.done[job].done():
            self.done.setdefault(job, self.loop.create_future())
        return self.done[job]

    @staticmethod
    async def _call(bus: MessageBus, path: str, interface: str, member: str,
                    signature: str = "", body: list[Any] | None = None,
                    destination: str = "org.hostvold1") -> list[Any]:
        reply = await bus.call(Message(destination=destination, path=path,
                                       interface=interface, member=member,
                                       signature=signature, body=body or []))
        assert reply is not None
        if reply.message_type != MessageType.METHOD_RETURN:
            raise SystemExit(f"{member}: {reply.error_name} {reply.body}")
        return list(reply.body)

    def create_snapshot(self, volume: str) -> tuple[str, bool]:
        """The new snapshot's object path and whether the guest was frozen for it."""
        async def create() -> tuple[str, bool]:
            (path,) = await self._call(self.bus, object_path("volumes", volume),
                                       "org.hostvold1.Volume", "CreateSnapshot", "a{sv}", [{}])
            (quiesced,) = await self._call(self.bus, str(path),
                                           "org.freedesktop.DBus.Properties", "Get", "ss",
                                           ["org.hostvold1.Snapshot", "Quiesced"])
            return str(path), bool(quiesced.value)
        return self._run(create())  # type: ignore[no-any-return]

    def delete_snapshot(self, snapshot: str) -> None:
        """Snapshot.Delete, then its Job's Completed signal."""
        async def delete() -> bool:
            (job,) = await self._call(self.bus, snapshot, "org.hostvold1.Snapshot", "Delete",
                                      "a{sv}", [{}])
            return await self._future(str(job))
        if not self._run(delete()):
            raise SystemExit(f"the delete of {snapshot} failed")

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.call_soon_threadsafe(self.loop.stop)


def stall(guest: RealGuest, serial: str, action: Callable[[], object]) -> float:
    """The longest gap of the probe on ``serial`` from just before ``action`` until its
    reports after it are in."""
    guest.wait_acked(serial, guest.acked(serial) + 2)  # a settled writer before each
    mark = guest.offset()
    action()
    return guest.longest_gap_ms(serial, mark)


class Sides:
    """The three volumes and how each side snapshots and commits them."""

    def __init__(self, guest: RealGuest, never: str, quiesced: str, scratch: Path) -> None:
        self.guest = guest
        self.never = never  # bus of the quiesce=never hostvold
        self.quiesced = quiesced  # bus of the quiesce=try hostvold
        self.never_client = BusClient(never)
        self.quiesced_client = BusClient(quiesced)
        self.scratch = scratch
        self.h = self.q = self.v = ""
        self.v_target = self.h_target = ""
        self.overlays = 0

    def attach(self, bus: str, size: str) -> str:
        volume = str(hostvolctl(bus, "create", size)["Id"])
        mark = self.guest.offset()
        hostvolctl(bus, "attach", volume, self.guest.name)
        self.guest.wait_acked(volume, 5, seconds=120, since=mark)
        return volume

    def setup(self, size: str) -> None:
        self.h = self.attach(self.never, size)
        self.q = self.attach(self.quiesced, size)
        # V lives on the quiesce=try daemon's share, but only libvirt touches its chain
        self.v = self.attach(self.quiesced, size)
        self.h_target = target_of(self.guest.name, self.h)
        self.v_target = target_of(self.guest.name, self.v)

    def virsh_snapshot(self, quiesce: bool) -> None:
        self.overlays += 1
        overlay = self.scratch / f"v-overlay-{self.overlays}.qcow2"
        others = [part for t in self.other_targets()
                  for part in ("--diskspec", f"{t},snapshot=no")]
        virsh("snapshot-create-as", self.guest.name, "--disk-only", "--atomic",
              "--no-metadata", *(["--quiesce"] if quiesce else []),
              "--diskspec", f"{self.v_target},snapshot=external,file={overlay}", *others)

    def other_targets(self) -> list[str]:
        import xml.etree.ElementTree as ET
        targets = []
        for disk in ET.fromstring(virsh("dumpxml", self.guest.name)).iter("disk"):
            target = disk.find("target")
            if target is not None and target.get("dev") != self.v_target:
                targets.append(str(target.get("dev")))
        return targets

    def virsh_commit(self) -> None:
        virsh("blockcommit", self.guest.name, self.v_target, "--active", "--pivot",
              "--wait")


def one_round(guest: RealGuest, sides: Sides, hostvold_first: bool) -> dict[str, float]:
    figures = {"floor": stall(guest, sides.h, lambda: time.sleep(1))}
    made: list[str] = []  # hostvold's two snapshots of this round

    def hostvold_create() -> None:
        made.append(sides.never_client.create_snapshot(sides.h)[0])

    def hostvold_quiesced() -> None:
        path, quiesced = sides.quiesced_client.create_snapshot(sides.q)
        assert quiesced, "the agent did not freeze"
        made.append(path)

    pairs: list[list[tuple[str, str, Callable[[], object]]]] = [
        [("create-hostvold", sides.h, hostvold_create),
         ("create-libvirt", sides.v, lambda: sides.virsh_snapshot(False))],
        [("commit-hostvold", sides.h, lambda: sides.never_client.delete_snapshot(made[0])),
         ("commit-libvirt", sides.v, sides.virsh_commit)],
        [("quiesced-hostvold", sides.q, hostvold_quiesced),
         ("quiesced-libvirt", sides.v, lambda: sides.virsh_snapshot(True))]]
    for pair in pairs:
        for key, serial, action in (pair if hostvold_first else reversed(pair)):
            figures[key] = stall(guest, serial, action)
    sides.quiesced_client.delete_snapshot(made[1])  # back to one layer each
    sides.virsh_commit()
    return figures


def measure(guest: RealGuest, sides: Sides, rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    for index in range(rounds):
        for key, value in one_round(guest, sides, index % 2 == 0).items():
            figures.setdefault(key, []).append(value)
        print(f"round {index + 1}: " + ", ".join(f"{key} {values[-1]:.0f} ms"
                                                 for key, values in figures.items()),
              file=sys.stderr, flush=True)
    return figures


def report(figures: dict[str, list[float]]) -> None:
    median = {key: statistics.median(values) for key, values in figures.items()}
    print(f"floor: the guest's longest gap over a quiet second {median['floor']:.0f} ms")
    for key in ("create", "quiesced", "commit"):
        print(f"{key}: hostvold {median[key + '-hostvold']:.0f} ms, libvirt's own "
              f"{median[key + '-libvirt']:.0f} ms (rounds: hostvold "
              f"{[round(v) for v in figures[key + '-hostvold']]}, libvirt "
              f"{[round(v) for v in figures[key + '-libvirt']]})")
    rows = {"create": "live snapshot create, guest's longest stall, hostvold vs virsh "
                      "snapshot-create-as --disk-only --atomic",
            "quiesced": "same with quiesce, hostvold (try, agent up) vs virsh ... --quiesce",
            "commit": "active commit + pivot, guest's longest stall, hostvold vs virsh "
                      "blockcommit --active --pivot"}
    for key, what in rows.items():
        ratio = median[key + "-hostvold"] / max(median[key + "-libvirt"], 0.001)
        verdict = "met" if ratio <= TARGET else "missed"
        print(f"P12: {what} = {ratio:.2f}x (target <= {TARGET}x): {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="64M")
    args = parser.parse_args()
    try:
        needs()
        ensure_libvirtd()
        image = ensure_image()
    except (CannotRun, BuildFailed) as exc:
        print(exc, file=sys.stderr)
        return CANNOT_RUN
    rig = Rig()
    try:
        rig.shared_mount_base()
        name = f"hostvold-bench-guest-{rig.root.name[-6:]}"
        guest = boot(image, name, rig.root / "console.log")
        conn = libvirt.open("qemu:///system")
        rig.undo.append(("domain", (conn, conn.lookupByName(name))))
        never, quiesced = rig.bus(), rig.bus("-q")
        rig.daemon(never, 512, "never")
        rig.daemon(quiesced, 512, "try", name="-q")
        scratch = rig.base / "shares-q"  # V's overlays beside V, on the same kind of share
        sides = Sides(guest, never, quiesced, next(scratch.iterdir()))
        sides.setup(args.size)
        report(measure(guest, sides, args.rounds))
    finally:
        rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
