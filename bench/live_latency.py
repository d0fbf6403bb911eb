"""Live snapshot latency: hostvold over D-Bus vs the bare libvirt floor, side by side.

    python -m bench.live_latency --bus ADDRESS --volume ID --domain NAME --scratch DIR

P1: an online snapshot create, D-Bus call to done, against ``qemu-img create -u`` plus
``snapshotCreateXML`` made bare on a scratch disk of the same domain (target <= 1.15x).
P2: for a snapshot delete (active commit + pivot), the time from the D-Bus call to the Job's
Completed signal against the time from the same call to libvirt's COMPLETED event, seen by
this process's own libvirt connection (target <= 1.2x; Nova polls every 500 ms); also the
gap between the two.
Then a line of JSON with the figures, and as the last two lines the P1 and P2 summaries
(bench/run_all.py). ``python -m bench.live_rig`` builds the domain, daemon and volume this
needs and runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt
import libvirtaio
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from hostvold.server.bus import object_path
from hostvold.storage.atomic import write_atomic
from hostvold.virt.guest import Guest, disk_xml, parse_disks
from hostvold.virt.hypervisor import Hypervisor

P1_TARGET = 1.15  # SPEC section 15: hostvold's create at most this times the bare one


async def dbus_call(bus: MessageBus, path: str, interface: str, member: str,
                    signature: str = "", body: list[Any] | None = None) -> list[Any]:
    reply = await bus.call(Message(destination="org.hostvold1", path=path,
                                   interface=interface, member=member, signature=signature,
                                   body=body or []))
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply.body
    return list(reply.body)


def durable_records(directory: Path) -> float:
    """Seconds for three atomic, durable writes of a small record in ``directory``."""
    start = time.perf_counter()
    for name in ("intent", "info", "done"):
        write_atomic(directory / f"bench-{name}.json", b"{}" * 200, 0o600)
    elapsed = time.perf_counter() - start
    for name in ("intent", "info", "done"):
        (directory / f"bench-{name}.json").unlink()
    return elapsed


def durable_finish(directory: Path, domain: Any) -> float:
    """Seconds for what must follow a delete's COMPLETED event before it may be called
    done: three durable records (pivoted, info file, done), a durable unlink of the file
    that left the chain, and one read of the live domain XML (the chain checked)."""
    victim = directory / "bench-victim"
    victim.write_bytes(b"x")
    start = time.perf_counter()
    durable_records(directory)
    domain.XMLDesc(0)
    victim.unlink()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    conn = libvirt.open("qemu:///system")
    domain = conn.lookupByName(args.domain)
    hypervisor = Hypervisor("qemu:///system")
    hypervisor.conn = conn
    guest = Guest(hypervisor, domain)
    events: list[tuple[float, int]] = []

    def on_block_job(c: Any, dom: Any, disk: str, job_type: int, status: int, o: Any) -> None:
        events.append((time.monotonic(), status))

    conn.domainEventRegisterAny(domain, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                                on_block_job, None)
    bus = await MessageBus(bus_address=args.bus, bus_type=BusType.SYSTEM).connect()
    completed: dict[str, float] = {}

    def on_signal(message: Message) -> None:
        if message.member == "Completed":
            completed[str(message.path)] = time.monotonic()

    bus.add_message_handler(on_signal)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',member='Completed'"]))

    # a scratch disk hostvold does not manage, for the bare calls
    scratch = Path(args.scratch) / f"scratch-{time.monotonic_ns()}"
    scratch.mkdir(mode=0o755)
    base = scratch / "base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "8M"], check=True)
    used = {d.target for d in parse_disks(domain.XMLDesc(0))}
    target = next(f"sd{c}" for c in "bcdefgh" if f"sd{c}" not in used)
    await guest.attach_disk(disk_xml(str(base), "raw", target, "scratch"))
    volume_path = object_path("volumes", args.volume)

    hostvold_times, bare_times, latencies, spans = [], [], [], []
    top = base.name
    for round_number in range(args.rounds):
        # the same start for both creates: the previous round's delete (a block job, durable
        # records) leaves writeback that would otherwise land in hostvold's fsyncs only
        await asyncio.to_thread(os.sync)
        start = time.perf_counter()
        (snapshot,) = await dbus_call(bus, volume_path, "org.hostvold1.Volume",
                                      "CreateSnapshot", "a{sv}", [{}])
        hostvold_times.append(time.perf_counter() - start)

        overlay = scratch / f"overlay-{round_number}.qcow2"
        await asyncio.to_thread(os.sync)
        start = time.perf_counter()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", top, "-F",
                        "raw" if top == base.name else "qcow2", str(overlay), "8M"],
                       check=True)
        others = [d.target for d in parse_disks(domain.XMLDesc(0)) if d.target != target]
        await guest.snapshot_disks({target: str(overlay)}, others)
        bare_times.append(time.perf_counter() - start)
        top = overlay.name

        events.clear()
        called = time.monotonic()
        (job,) = await dbus_call(bus, str(snapshot), "org.hostvold1.Snapshot", "Delete",
                                 "a{sv}", [{}])
        while str(job) not in completed:
            await asyncio.sleep(0.005)  # the benchmark's own wait; not hostvold's
        done_events = [t for t, status in events if status == 0]
        if done_events:
            latencies.append((completed[str(job)] - done_events[-1]) * 1000)
            spans.append((completed[str(job)] - called) / (done_events[-1] - called))

    await guest.detach_disk(disk_xml(str(scratch / top), "qcow2", target, "scratch"))
    bus.disconnect()
    durable = statistics.median(durable_records(scratch) for _ in range(args.rounds))
    finish_floor = statistics.median(durable_finish(scratch, domain) for _ in range(args.rounds))
    shutil.rmtree(scratch, ignore_errors=True)
    hv, bare = statistics.median(hostvold_times), statistics.median(bare_times)
    figures = {"hostvold_create_ms": hv * 1000, "bare_create_ms": bare * 1000,
               "ratio": hv / bare,
               "event_to_completed_ms": statistics.median(latencies) if latencies else -1.0,
               "completed_vs_event_ratio": statistics.median(spans) if spans else -1.0}
    print(f"online snapshot create, median of {args.rounds}: hostvold over D-Bus "
          f"{hv * 1000:.1f} ms, bare qemu-img create -u + snapshotCreateXML "
          f"{bare * 1000:.1f} ms: {hv / bare:.2f}x (P1 target <= {P1_TARGET}x)")
    print(f"of which durable: the three records a crash-safe online snapshot writes (intent, "
          f"info file, done: write, fsync, rename, fsync the directory) take "
          f"{durable * 1000:.1f} ms on this share; bare + those = {(bare + durable) * 1000:.1f} "
          f"ms: hostvold {hv / (bare + durable):.2f}x of that floor; the rest "
          f"({(hv - bare - durable) * 1000:.1f} ms) is the D-Bus call, three reads of the "
          "live domain XML and the chain check")
    figures["finish_floor_ms"] = finish_floor * 1000
    print(f"libvirt COMPLETED event to Job Completed signal: "
          f"{figures['event_to_completed_ms']:.2f} ms; the floor after the event (three "
          f"durable records, a durable unlink, one live XML read, on this share): "
          f"{finish_floor * 1000:.2f} ms")
    if spans and latencies:
        event_ms = statistics.median(latencies) / (statistics.median(spans) - 1)
        print(f"call to libvirt's event {event_ms:.1f} ms: with only that floor after it, "
              f"the P2 ratio would be {(event_ms + finish_floor * 1000) / event_ms:.2f}x")
    return figures


def summary(figures: dict[str, float]) -> list[str]:
    """The P1 and P2 lines (bench/run_all.py reads them); P2 only when libvirt's event came."""
    ratio = round(figures["ratio"], 2)
    lines = [f"P1: online snapshot create over D-Bus vs bare qemu-img create -u + "
             f"snapshotCreateXML = {ratio:.2f}x (target <= {P1_TARGET}x): "
             f"{'met' if ratio <= P1_TARGET else 'missed'}"]
    if figures["completed_vs_event_ratio"] > 0:
        span = round(figures["completed_vs_event_ratio"], 2)
        lines.append(f"P2: delete's block job, call to the Job's Completed vs to libvirt's "
                     f"COMPLETED event = {span:.2f}x (target <= 1.2x): "
                     f"{'met' if span <= 1.2 else 'missed'}")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bus", required=True)
    parser.add_argument("--volume", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    results = asyncio.run(main(arguments))
    print(json.dumps(results))
    print("\n".join(summary(results)))
