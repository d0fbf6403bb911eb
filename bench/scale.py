"""Scale (P6): daemon start and GetManagedObjects at N volumes against at B (default 10,000
against 1,000, the SPEC's sizes), and the memory each volume adds, side by side in one run.

    python bench/scale.py [--volumes 10000] [--base 1000] [--dir /path]

Volumes are created through the service (sparse raw 64 MiB, a snapshot on every tenth),
then the daemon is started in a process of its own on a private dbus-daemon for each size.
GetManagedObjects is timed as a dbus-fast client sees it (the figure), and beside it the
client's decoding alone (from the answer's bytes) and the call read raw from the socket,
nothing decoded (the daemon's and the bus's part).
The last three lines are the P6 summaries (bench/run_all.py): start with the index loaded and
GetManagedObjects, N volumes against B (target: no worse than linear, N / B; the SPEC's 10x
is 10,000 against 1,000), and the RSS each volume adds between B and N volumes (target
<= 10 KiB), taken after the GetManagedObjects answers (each volume then holds its
marshalled entry).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.aio import MessageBus

from hostvold.core.collector import collector_paused
from hostvold.core.config import parse_config
from hostvold.server.daemon import Daemon

POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={socket}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>
<allow send_destination="*"/><allow receive_type="method_call"/>
<allow receive_type="method_return"/><allow receive_type="error"/>
<allow receive_type="signal"/><allow send_type="signal"/>
<allow send_requested_reply="true" send_type="method_return"/>
<allow send_requested_reply="true" send_type="error"/></policy></busconfig>"""


async def populate(state_dir: Path, count: int) -> None:
    daemon = Daemon(parse_config(f"[daemon]\nstate_dir = {state_dir}\n"), with_libvirt=False)
    volumes = await daemon.start()
    assert daemon.ops is not None
    for start in range(0, count, 64):
        made = await asyncio.gather(*(volumes.create_volume(size=64 << 20)
                                      for _ in range(min(64, count - start))))
        for meta in made[::10]:
            await daemon.ops.create_snapshot(meta.id)
    await daemon.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def managed_objects(address: str, rounds: int = 15) -> tuple[float, int, float]:
    """The median seconds of ``rounds`` GetManagedObjects calls, the objects seen, and the
    median seconds this client takes to decode that answer alone (from its bytes, no bus):
    the part of the figure no daemon can change."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with collector_paused():  # as hostvolctl decodes it: this client's own collector
            reply = await bus.call(Message(  # would otherwise weigh on the figure
                destination="org.hostvold1", path="/org/hostvold1",
                interface="org.freedesktop.DBus.ObjectManager", member="GetManagedObjects"))
        times.append(time.perf_counter() - start)
        assert reply is not None
    bus.disconnect()
    data = bytes(reply._marshall(False))
    decodes = []
    for _ in range(rounds):
        with collector_paused():
            start = time.perf_counter()
            Unmarshaller(io.BytesIO(data)).unmarshall()
            decodes.append(time.perf_counter() - start)
    return statistics.median(times), len(reply.body[0]), statistics.median(decodes)


def raw_managed_objects(address: str, rounds: int = 15) -> float:
    """The median seconds of ``rounds`` GetManagedObjects calls read raw from the socket in
    1 MiB reads, nothing decoded: the daemon, the bus and the sockets, without a client
    library's own reading and decoding (dbus-fast reads 8 KiB at a time)."""
    path = address.split("unix:path=", 1)[1].split(",", 1)[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        if not sock.recv(4096).startswith(b"OK"):
            raise SystemExit("the private bus refused EXTERNAL authentication")
        sock.sendall(b"BEGIN\r\n")

        def reply_to(message: Message) -> None:
            sock.sendall(bytes(message._marshall(False)))
            while True:  # up to the method return (signals, such as NameAcquired, skipped)
                head = bytearray()
                while len(head) < 16:
                    head += sock.recv(16 - len(head))
                body, fields = struct.unpack_from("<I4xI", head, 4)
                left = fields + (-fields & 7) + body
                while left:
                    left -= len(sock.recv(min(left, 1 << 20)))
                if head[1] == MessageType.ERROR.value:
                    raise SystemExit(f"{message.member} failed on the raw connection")
                if head[1] == MessageType.METHOD_RETURN.value:
                    return

        reply_to(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                         interface="org.freedesktop.DBus", member="Hello", serial=1))
        times = []
        for serial in range(2, rounds + 2):
            start = time.perf_counter()
            reply_to(Message(destination="org.hostvold1", path="/org/hostvold1",
                             interface="org.freedesktop.DBus.ObjectManager",
                             member="GetManagedObjects", serial=serial))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(root: Path, state_dir: Path, address: str) -> dict[str, float]:
    notify = root / f"notify-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    config = root / f"conf-{time.monotonic_ns()}"
    config.write_text(f"[daemon]\nstate_dir = {state_dir}\nbus = {address}\n"
                      "[libvirt]\nuri = test:///default\n")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hostvold", "--config", str(config)],
                            env=dict(os.environ, NOTIFY_SOCKET=str(notify)),
                            stderr=open(root / "hostvold.log", "a"))  # noqa: SIM115
    listener.settimeout(0.5)  # READY=1 wakes it at once; the timeout only looks at proc
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(TimeoutError):
            if b"READY=1" in listener.recv(4096):
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            tail = (root / "hostvold.log").read_text().strip().splitlines()[-3:]
            raise SystemExit(f"hostvold did not become ready (exit {proc.wait()}): "
                             + " | ".join(tail))
    started = time.perf_counter() - start
    query, objects, decode = asyncio.run(managed_objects(address))
    raw = raw_managed_objects(address)
    rss = rss_kib(proc.pid)  # after the answers: with each volume's marshalled entry kept
    proc.terminate()
    proc.wait()
    listener.close()
    return {"start": started, "query": query, "objects": objects, "rss_kib": rss,
            "decode": decode, "raw": raw}


def unmounted(state_dir: Path) -> Path:
    """``state_dir`` with the daemon's mount base unmounted (it binds the base onto itself
    to make it shared)."""
    subprocess.run(["umount", "-R", "-l", str(state_dir / "mnt")], capture_output=True)
    return state_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=10000)
    parser.add_argument("--base", type=int, default=1000,
                        help="the smaller share it is compared with (SPEC: 1,000)")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if not 0 < args.base < args.volumes:
        parser.error("--base must be above 0 and below --volumes")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        (root / "bus.conf").write_text(POLICY.format(socket=root / "bus"))
        bus = subprocess.Popen(["dbus-daemon", "--nofork", "--print-address=1",
                                f"--config-file={root / 'bus.conf'}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert bus.stdout is not None
        address = bus.stdout.readline().strip()
        results = {}
        try:
            for count in (args.base, args.volumes):
                state_dir = root / f"state-{count}"
                t0 = time.perf_counter()
                asyncio.run(populate(state_dir, count))
                print(f"populated {count} volumes in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)
                (state_dir / "index.sqlite").unlink()  # the start rebuilds from the share
                results[count] = {"rebuild": measure(root, state_dir, address),
                                  "load": measure(root, state_dir, address)}
                shutil.rmtree(unmounted(state_dir), ignore_errors=True)
        finally:  # also when a run fails: no bus left running, no mount left behind
            bus.terminate()
            bus.wait()
            for count in (args.base, args.volumes):
                unmounted(root / f"state-{count}")
    small, big = results[args.base], results[args.volumes]
    factor = args.volumes / args.base
    linear = factor if factor == int(factor) else round(factor, 1)
    print(f"{'':24}{f'{args.base} volumes':>14}{f'{args.volumes} volumes':>18}{'ratio':>9}  "
          f"(volumes x{linear:g}; P6 target <= {linear:g}x)")
    for label, key, field in (("start, index rebuilt", "rebuild", "start"),
                              ("start, index loaded", "load", "start"),
                              ("GetManagedObjects", "load", "query"),
                              ("  its decoding alone", "load", "decode"),
                              ("  read raw, undecoded", "load", "raw")):
        a, b = small[key][field], big[key][field]
        print(f"{label:<24}{a * 1000:>11.1f} ms{b * 1000:>15.1f} ms{b / a:>8.1f}x")
    rest = [(r["load"]["query"] - r["load"]["decode"]) * 1000 for r in (small, big)]
    print(f"GetManagedObjects without the client's decoding (daemon, bus, sockets and the "
          f"client library's reading): "
          f"{rest[0]:.1f} ms -> {rest[1]:.1f} ms = {rest[1] / rest[0]:.1f}x; the decoding "
          "alone, in this client's library, is the floor of the whole call's ratio")
    raw = [r["load"]["raw"] * 1000 for r in (small, big)]
    print(f"GetManagedObjects read raw from the socket in 1 MiB reads, nothing decoded (the "
          f"daemon, the bus, the sockets): {raw[0]:.1f} ms -> {raw[1]:.1f} ms = "
          f"{raw[1] / raw[0]:.1f}x; the rest of the whole call is the client library's own "
          "reading (8 KiB at a time) and decoding")
    per_volume = ((big["load"]["rss_kib"] - small["load"]["rss_kib"])
                  / (args.volumes - args.base))
    print(f"RSS {small['load']['rss_kib']} KiB -> {big['load']['rss_kib']} KiB: "
          f"{per_volume:.1f} KiB per volume (P6 target <= 10 KiB); objects exported "
          f"{big['load']['objects']}")
    for label, field in (("daemon start, index loaded", "start"),
                         ("GetManagedObjects", "query")):
        ratio = round(big["load"][field] / small["load"][field], 2)
        print(f"P6: {label}, {args.volumes} vs {args.base} volumes = {ratio:.2f}x "
              f"(target <= {linear:g}x): {'met' if ratio <= linear else 'missed'}")
    per_volume = round(per_volume, 1)
    print(f"P6: RSS added per volume, {args.volumes} vs {args.base} volumes = "
          f"{per_volume:.1f} KiB "
          f"(target <= 10 KiB): {'met' if per_volume <= 10 else 'missed'}")


if __name__ == "__main__":
    main()
