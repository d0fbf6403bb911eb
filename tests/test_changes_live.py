"""Changed-block export of an attached volume (SPEC section 5b) on a real TCG domain, through
the daemon over D-Bus, read by libnbd (tests/nbd_reader.py) as an independent client.

- The guest keeps writing through QEMU before, during and after the export. The restore
  (S1's full copy plus the increment) equals the temporary snapshot's point in time: the
  frozen layer the domain's live XML shows under its active file while the export is open,
  and that layer equals the writes QEMU had completed at one moment between the call and
  its reply. Afterwards the chain, the info file and the domain XML are as before, every
  guest write is in the volume, and nothing of the export is left.
- QEMU killed between two backups: the next export from S1, detached and then attached to
  the domain started again, still restores exactly (no dirty bitmap to lose).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from bench.live_rig import DOMAIN_XML
from hostvold.server.bus import object_path
from hostvold.storage.changeview import CONTEXT
from tests.conftest import DaemonProcess, Host, need
from tests.test_dbus import Cli
from tests.test_live import guest_flush, live_disk

pytestmark = pytest.mark.integration
KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
READER = Path(__file__).resolve().parent / "nbd_reader.py"
LOW = 48 * MiB  # writes that must survive a QEMU crash stay below; unflushed ones above
Live = Callable[..., tuple[Cli, DaemonProcess, Host]]


@pytest.fixture(autouse=True)
def libnbd_reader() -> None:
    need(shutil.which("qemu-nbd") is not None and subprocess.run(
        ["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode == 0,
         "qemu-nbd and python3-libnbd (Debian: qemu-utils python3-libnbd)")


# ---- the guest's writes, and what the volume must read -----------------------------------

@dataclass(frozen=True)
class Write:
    offset: int
    length: int
    pattern: int


@dataclass
class Guest:
    """Writes by the running QEMU itself into the disk's active layer (HMP ``qemu-io``),
    recorded in the order they completed; one writer at a time. Each write has a pattern
    of its own, so every write changes what the volume reads."""

    domain: str
    alias: str
    base: bytes = bytes(SIZE)  # what the volume read before these writes
    first_pattern: int = 1
    writes: list[Write] = field(default_factory=list)
    started: int = 0  # writes issued (the last one may still run)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, offset: int, length: int) -> None:
        with self.lock:
            pattern = self.first_pattern + self.started
            self.started += 1
        assert pattern < 256, "one pattern per write: too many writes for one volume"
        self.hmp(f"write -P {pattern} {offset} {length}")
        with self.lock:
            self.writes.append(Write(offset, length, pattern))

    def flush(self) -> None:
        guest_flush(self.domain, self.alias)

    def hmp(self, command: str) -> None:
        result = subprocess.run(
            ["virsh", "-c", "qemu:///system", "qemu-monitor-command", self.domain, "--hmp",
             f'qemu-io -d {self.alias} "{command}"'],
            capture_output=True, text=True, check=True, timeout=120)
        assert "error" not in result.stdout.lower(), result.stdout

    @property
    def done(self) -> int:
        with self.lock:
            return len(self.writes)

    def image(self, count: int | None = None) -> bytearray:
        """What the volume reads after the first ``count`` writes (default: all)."""
        data = bytearray(self.base)
        for w in self.writes[:count]:
            data[w.offset:w.offset + w.length] = bytes([w.pattern]) * w.length
        return data

    def scribble(self, rng: random.Random, count: int, lengths: tuple[int, ...],
                 low: int = 0, high: int = LOW) -> None:
        for _ in range(count):
            self.write(*place(rng, rng.choice(lengths), low, high))


def place(rng: random.Random, length: int, low: int, high: int) -> tuple[int, int]:
    """A 64 KiB-aligned range of ``length`` in [low, high)."""
    return rng.randrange(low // (64 * KiB), (high - length) // (64 * KiB)) * 64 * KiB, length


class Background(threading.Thread):
    """The guest writing on, 64 KiB at a time, until told to stop (or ``limit`` writes:
    less than the frozen layer holds, so merging the temporary snapshot commits it down)."""

    def __init__(self, guest: Guest, seed: int, limit: int = 48) -> None:
        super().__init__(daemon=True)
        self.guest, self.rng, self.limit = guest, random.Random(seed), limit
        self.stopping = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set() and self.count < self.limit:
                self.guest.write(*place(self.rng, 64 * KiB, 0, LOW))
                self.count += 1
        except BaseException as exc:  # the test asserts it after join
            self.error = exc

    def finish(self) -> None:
        self.stopping.set()
        self.join(300)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ---- the export over D-Bus, read by libnbd ----------------------------------------------

@dataclass
class Exported:
    fd: int
    extents: list[tuple[int, int, bool, bool]]
    info: dict[str, Any]


async def _export_changes(address: str, vid: str, since: str, to: str) -> Exported:
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM,
                           negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(
            destination="org.hostvold1", path=object_path("volumes", vid),
            interface="org.hostvold1.Volume", member="ExportChanges", signature="ssa{sv}",
            body=[since, to, {}]))
    finally:
        bus.disconnect()
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        for fd in reply.unix_fds:
            os.close(fd)
        raise AssertionError(f"{reply.error_name}: {reply.body}")
    index, extents, info = reply.body
    assert len(reply.unix_fds) == 1, reply.unix_fds
    return Exported(reply.unix_fds[index], [tuple(e) for e in extents],
                    {k: v.value if isinstance(v, Variant) else v for k, v in info.items()})


def export_changes(cli: Cli, vid: str, since: str, to: str = "") -> Exported:
    return asyncio.run(_export_changes(cli.address, vid, since, to))


def read_export(exported: Exported, onto: Path) -> dict[str, Any]:
    """libnbd reads the export, restoring every dirty extent onto ``onto``; the
    connection is closed after, so the server (and the job) end."""
    try:
        read = subprocess.run(["/usr/bin/python3", str(READER), str(exported.fd), CONTEXT,
                               str(onto)], pass_fds=(exported.fd,), capture_output=True,
                              text=True, timeout=120)
    finally:
        os.close(exported.fd)
    assert read.returncode == 0, read.stderr
    seen: dict[str, Any] = json.loads(read.stdout)
    return seen


def dirty_ranges(extents: list[Any], flag: Callable[[Any], bool]) -> list[tuple[int, int]]:
    """Merged (start, end) of the extents ``flag`` marks."""
    out: list[tuple[int, int]] = []
    for e in sorted(extents, key=lambda e: e[0]):
        if not flag(e):
            continue
        start, end = e[0], e[0] + e[1]
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def written_ranges(writes: list[Write], cluster: int) -> list[tuple[int, int]]:
    """The clusters ``writes`` allocate in a qcow2 overlay, merged."""
    runs = []
    for w in writes:
        start = w.offset // cluster * cluster
        end = -(-(w.offset + w.length) // cluster) * cluster
        runs.append((start, end - start))
    return dirty_ranges(runs, lambda e: True)


# ---- files -----------------------------------------------------------------------------

def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                          check=True).stdout


def to_raw(path: str | Path, fmt: str, out: Path, share: bool = False) -> Path:
    qemu_img("convert", *(["-U"] if share else []), "-f", fmt, "-O", "raw", str(path),
             str(out))
    return out


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                          capture_output=True).returncode == 0


def volume_state(cli: Cli, domain: str | None, share: Path, vid: str) -> dict[str, Any]:
    """What an export must leave as it found: info file, the chain from the headers, the
    volume's files, its snapshots, and (attached) the domain's disk."""
    info = json.loads((share / f"volume-{vid}.info").read_text())
    active = share / info["active"]
    fmt = "raw" if info["active"] == f"volume-{vid}" else "qcow2"
    chain = json.loads(qemu_img("info", "-U", "-f", fmt, "--output=json", "--backing-chain",
                                str(active)))
    state = {
        "info": info,
        "chain": [(Path(layer["filename"]).name, layer.get("backing-filename"),
                   layer["format"]) for layer in chain],
        "files": sorted(p.name for p in share.iterdir() if p.name.startswith(f"volume-{vid}")),
        "snapshots": sorted(s["Id"] for s in cli.json("snapshots", vid)),
        "state": cli.json("show", vid)["State"],
    }
    if domain is not None:
        disk = live_disk(domain, vid)
        state["disk"] = (disk.source, disk.format, disk.chain)
    return state


def nothing_left(host: Host) -> None:
    exports = host.state_dir / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"qemu-nbd .*{exports}"],
                                    capture_output=True).returncode == 1, 10,
             "a qemu-nbd of the export is still running")


# ---- one export of the attached volume while the guest writes -----------------------------

@dataclass
class LiveExport:
    restored: Path
    frozen: Path  # a raw copy of the temporary snapshot's frozen layer, made during the export
    moment: int  # the guest writes the frozen layer holds
    exported: Exported
    seen: dict[str, Any]
    job: dict[str, Any]
    background: int  # writes made meanwhile


def export_while_writing(cli: Cli, domain: str, guest: Guest, vid: str, since: str,
                         base: Path, scratch: Path, seed: int) -> LiveExport:
    """ExportChanges(since, now) of the attached volume with the guest writing before the
    call, during it, while libnbd reads and while the temporary snapshot is merged."""
    active_before = live_disk(domain, vid).source
    writer = Background(guest, seed)
    try:
        writer.start()
        wait_for(lambda: writer.count >= 2, 60, "the guest does not write")
        completed = guest.done
        exported = export_changes(cli, vid, since)
        issued = guest.started
        disk = live_disk(domain, vid)
        # the temporary snapshot: QEMU writes a new file; the old active one is frozen
        assert disk.source != active_before and disk.chain[1] == active_before, disk
        after_reply = writer.count
        wait_for(lambda: writer.count >= after_reply + 3 or not writer.is_alive(), 60,
                 "the guest stopped writing during the export")
        frozen = to_raw(disk.chain[1], "qcow2", scratch / f"frozen-{seed}.raw")
        restored = scratch / f"restored-{seed}.raw"
        shutil.copyfile(base, restored)
        seen = read_export(exported, restored)
        job = cli.job_ended(exported.info["job"])
    finally:
        writer.finish()
    assert job["State"] == "completed", job
    # the frozen layer is the volume at one moment between the call and its reply
    content = frozen.read_bytes()
    moment = next((k for k in range(completed, issued + 1) if content == guest.image(k)), -1)
    assert moment >= 0, (completed, issued)
    return LiveExport(restored, frozen, moment, exported, seen, job, writer.count)


# ---- the tests ---------------------------------------------------------------------------

def attached(live: Live, domain: str) -> tuple[Cli, DaemonProcess, Host, str, Guest, Path]:
    cli, process, host = live("[libvirt]\nquiesce = never\n")
    vid = cli.json("create", str(SIZE))["Id"]
    cli.json("attach", vid, domain)
    disk = live_disk(domain, vid)
    return cli, process, host, vid, Guest(domain, str(disk.alias)), Path(disk.source).parent


def first_snapshot(cli: Cli, domain: str, guest: Guest, vid: str, rng: random.Random,
                   scratch: Path) -> tuple[str, Path, int]:
    """Writes, then S1 (live), and S1's full copy (its data layer, frozen now)."""
    guest.scribble(rng, 8, (64 * KiB, 256 * KiB, MiB))
    s1 = cli.json("snapshot", "create", vid)["Id"]
    disk = live_disk(domain, vid)
    full = to_raw(disk.chain[1], "raw", scratch / "s1.raw")
    assert full.read_bytes() == guest.image()
    return s1, full, guest.done


def test_export_while_the_guest_writes(live: Live, domain: str, tmp_path: Path) -> None:
    cli, process, host, vid, guest, share = attached(live, domain)
    rng = random.Random(5)
    s1, s1_full, at_s1 = first_snapshot(cli, domain, guest, vid, rng, tmp_path)
    guest.scribble(rng, 24, (64 * KiB, 256 * KiB, MiB, 2 * MiB))  # the S1 overlay
    guest.flush()
    before = volume_state(cli, domain, share, vid)
    cluster = int(json.loads(qemu_img("info", "-U", "-f", "qcow2", "--output=json",
                                      str(share / before["info"]["active"])))["cluster-size"])

    done = export_while_writing(cli, domain, guest, vid, s1, s1_full, tmp_path, seed=6)
    print(f"\nthe guest wrote {done.background} times meanwhile; the frozen layer holds "
          f"{done.moment - at_s1} of the {guest.done - at_s1} writes after S1")

    # the restore is the temporary snapshot's point in time, not the volume now
    assert same(done.restored, done.frozen)
    assert done.moment < guest.done  # the guest wrote after the moment: a different image
    # what is marked changed is exactly what the guest wrote from S1 to that moment
    expected = written_ranges(guest.writes[at_s1:done.moment], cluster)
    assert dirty_ranges(done.exported.extents, lambda e: e[2]) == expected
    assert dirty_ranges(done.seen["extents"], lambda e: e[2] & 1) == expected
    assert done.exported.info["from"] == s1 and not done.exported.info["fallback"]
    assert done.exported.info["size"] == done.seen["size"] == SIZE
    assert done.exported.info["changed"] == sum(end - start for start, end in expected)

    # afterwards: every write is in the volume, and everything else as before
    guest.flush()
    now = to_raw(live_disk(domain, vid).source, "qcow2", tmp_path / "now.raw", share=True)
    assert now.read_bytes() == guest.image()
    assert not same(done.restored, now)  # negative control: the volume moved on
    assert volume_state(cli, domain, share, vid) == before
    conn = libvirt.open("qemu:///system")
    try:
        target = live_disk(domain, vid).target
        assert conn.lookupByName(domain).blockJobInfo(target, 0) == {}
    finally:
        conn.close()
    nothing_left(host)
    assert "NBD server of volume" not in process.log_text()


def kill_qemu(domain: str) -> None:
    """kill -9 of the domain's QEMU, as a crash would."""
    pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def open_conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    try:
        yield conn
    finally:
        conn.close()


def test_qemu_killed_between_two_backups(live: Live, domain: str, tmp_path: Path) -> None:
    cli, _, host, vid, guest, share = attached(live, domain)
    rng = random.Random(9)
    s1, s1_full, _ = first_snapshot(cli, domain, guest, vid, rng, tmp_path)
    guest.scribble(rng, 16, (64 * KiB, 256 * KiB, MiB))
    guest.flush()
    first = export_while_writing(cli, domain, guest, vid, s1, s1_full, tmp_path, seed=10)
    assert same(first.restored, first.frozen)

    # more writes, the last ones never flushed; then QEMU dies
    guest.scribble(rng, 10, (64 * KiB, 256 * KiB))
    guest.flush()
    durable = guest.done
    guest.scribble(rng, 4, (64 * KiB, 256 * KiB), LOW, SIZE)
    kill_qemu(domain)
    wait_for(lambda: cli.json("show", vid)["State"] == "available", 30,
             "the volume stayed in-use after QEMU died")

    # the next backup, detached: S1's copy plus the increment is the volume now
    state = volume_state(cli, None, share, vid)
    active = share / state["info"]["active"]
    now = to_raw(active, "qcow2", tmp_path / "crashed.raw")
    assert now.read_bytes()[:LOW] == guest.image(durable)[:LOW]
    exported = export_changes(cli, vid, s1)
    restored = tmp_path / "after-crash.raw"
    shutil.copyfile(s1_full, restored)
    read_export(exported, restored)
    assert cli.job_ended(exported.info["job"])["State"] == "completed"
    assert same(restored, now)
    assert not exported.info["fallback"] and exported.info["from"] == s1
    assert volume_state(cli, None, share, vid) == state
    nothing_left(host)

    # the domain starts again, the volume is attached again, and the next backup is live
    with open_conn() as conn:
        conn.createXML(DOMAIN_XML.format(name=domain), 0)
    cli.json("attach", vid, domain)
    # the model goes on from what the crash left (unflushed writes may or may not be in)
    guest = Guest(domain, str(live_disk(domain, vid).alias), base=now.read_bytes(),
                  first_pattern=guest.first_pattern + guest.started)
    guest.scribble(rng, 8, (64 * KiB, 256 * KiB))
    guest.flush()
    before = volume_state(cli, domain, share, vid)
    third = export_while_writing(cli, domain, guest, vid, s1, s1_full, tmp_path, seed=11)
    assert same(third.restored, third.frozen)
    assert volume_state(cli, domain, share, vid) == before
    nothing_left(host)




def test_more_written_during_the_export_than_the_frozen_layer_holds(
        live: Live, domain: str, tmp_path: Path) -> None:
    """The guest writes more while the export is open than the frozen layer holds: the
    data stays exact, and the temporary snapshot must still be merged away so that the
    volume's files, info file and domain XML are as before."""
    cli, _, host, vid, guest, share = attached(live, domain)
    s1, s1_full, _ = first_snapshot(cli, domain, guest, vid, random.Random(13), tmp_path)
    guest.write(0, 64 * KiB)  # all the S1 overlay holds
    guest.flush()
    before = volume_state(cli, domain, share, vid)
    exported = export_changes(cli, vid, s1)
    frozen = to_raw(live_disk(domain, vid).chain[1], "qcow2", tmp_path / "frozen.raw")
    assert frozen.read_bytes() == guest.image()
    for i in range(8):  # 8 MiB into the temporary overlay
        guest.write((4 + i) * MiB, MiB)
    restored = tmp_path / "restored.raw"
    shutil.copyfile(s1_full, restored)
    read_export(exported, restored)
    assert cli.job_ended(exported.info["job"])["State"] == "completed"
    assert same(restored, frozen)
    guest.flush()
    now = to_raw(live_disk(domain, vid).source, "qcow2", tmp_path / "now.raw", share=True)
    assert now.read_bytes() == guest.image()
    nothing_left(host)
    after = volume_state(cli, domain, share, vid)
    assert after == before  # merged by active commit: the active file keeps its name


# ---- deletes: every surviving pair stays exact; a deleted ``from`` falls back ---------------

@dataclass(frozen=True)
class Point:
    """A snapshot's point in time: the guest writes it holds, and a full raw copy of it
    made right after it was taken."""

    at: int
    full: Path


def matches(path: Path, data: bytes | bytearray) -> bool:
    """A named boolean (an ``assert a == b`` on 64 MiB would make pytest diff them)."""
    return path.read_bytes() == data


class Pairs:
    """Snapshots taken live with a full copy of each point in time, and restores between
    them checked against those copies and the writes' model."""

    def __init__(self, cli: Cli, domain: str, guest: Guest, vid: str, scratch: Path) -> None:
        self.cli, self.domain, self.guest, self.vid = cli, domain, guest, vid
        self.scratch = scratch
        self.points: dict[str, Point] = {}
        self.cluster = 64 * KiB  # checked once the first overlay exists
        self.restores = 0

    def take(self) -> str:
        sid: str = self.cli.json("snapshot", "create", self.vid)["Id"]
        frozen = Path(live_disk(self.domain, self.vid).chain[1])
        fmt = "raw" if frozen.name == f"volume-{self.vid}" else "qcow2"
        full = to_raw(frozen, fmt, self.scratch / f"{sid}.raw")
        assert matches(full, self.guest.image()), f"{sid}'s full copy is not its point in time"
        self.points[sid] = Point(self.guest.done, full)
        return sid

    def restore(self, since: str, to: str = "", fallback_to: str = "",
                onto_from: str = "") -> bool:
        """ExportChanges(since, to) read by libnbd onto the full copy of the snapshot the
        daemon says it counted from (``fallback_to`` when ``since`` is deleted); the extents
        marked changed are exactly the clusters written between the two points. Whether
        the restore is ``to``'s full copy (or, ``to`` = now, the volume: nothing writes
        during the call). ``onto_from``: another snapshot's copy (a negative control)."""
        self.guest.flush()
        exported = export_changes(self.cli, self.vid, since, to)
        used = fallback_to or since
        assert (exported.info["from"], exported.info["fallback"]) == (used, bool(fallback_to)), \
            (since, to, exported.info)
        onto = self.scratch / "restore.raw"
        shutil.copyfile(self.points[onto_from or used].full, onto)
        seen = read_export(exported, onto)
        assert self.cli.job_ended(exported.info["job"])["State"] == "completed"
        self.restores += 1
        end = self.points[to].at if to else self.guest.done
        expected = written_ranges(self.guest.writes[self.points[used].at:end], self.cluster)
        assert dirty_ranges(exported.extents, lambda e: e[2]) == expected, (since, to)
        assert dirty_ranges(seen["extents"], lambda e: e[2] & 1) == expected, (since, to)
        return matches(onto, self.points[to].full.read_bytes() if to else self.guest.image())

    def every_pair(self, survivors: list[str]) -> None:
        assert sorted(s["Id"] for s in self.cli.json("snapshots", self.vid)) == \
            sorted(survivors)
        for i, since in enumerate(survivors):
            for to in [*survivors[i + 1:], ""]:
                assert self.restore(since, to), f"{since} -> {to or 'now'} is not exact"


def deleted_live(cli: Cli, process: DaemonProcess, share: Path, vid: str, sid: str,
                 strategy: str) -> None:
    cli.json("snapshot", "delete", sid)
    assert f"deleting snapshot {sid} of volume {vid} live by {strategy}" in process.log_text()
    assert json.loads((share / f"volume-{vid}.meta").read_text()).get("operation") is None
    assert sid not in json.loads((share / f"volume-{vid}.info").read_text())


def test_deletes_keep_every_pair_exact_and_a_deleted_from_falls_back(
        live: Live, domain: str, tmp_path: Path) -> None:
    """S1..S5 taken live while QEMU writes, each with a full copy. Deleting an
    intermediate snapshot live by commit, the newest live by active commit and (after S6)
    by pull, and an intermediate one offline (detached): after each, every surviving pair
    and every survivor to now restores exactly, marking just the clusters written between
    them, detached and attached again. An export from a deleted snapshot counts from the
    nearest older survivor, says so, and restores exactly from that one's full copy."""
    cli, process, host, vid, guest, share = attached(live, domain)
    rng = random.Random(21)
    pairs = Pairs(cli, domain, guest, vid, tmp_path)
    guest.scribble(rng, 8, (64 * KiB, 256 * KiB, MiB))
    s1 = pairs.take()
    pairs.cluster = int(json.loads(qemu_img(
        "info", "-U", "-f", "qcow2", "--output=json",
        live_disk(domain, vid).source))["cluster-size"])
    assert pairs.cluster == 64 * KiB  # the writes are 64 KiB-aligned: the map is exact
    guest.scribble(rng, 6, (64 * KiB, 256 * KiB, MiB))
    s2 = pairs.take()
    guest.scribble(rng, 6, (64 * KiB, 256 * KiB, MiB))
    s3 = pairs.take()
    guest.scribble(rng, 6, (64 * KiB, 256 * KiB, MiB))
    s4 = pairs.take()
    guest.scribble(rng, 6, (256 * KiB, MiB))
    s5 = pairs.take()
    guest.scribble(rng, 2, (64 * KiB,))  # S5's overlay (the active file) holds less than S4's

    # an intermediate snapshot, live, by commit below the active file
    deleted_live(cli, process, share, vid, s2, "commit")
    pairs.every_pair([s1, s3, s4, s5])
    # negative control: the increment S3 -> S4 on S1's full copy is not S4
    assert not pairs.restore(s3, s4, onto_from=s1)

    # the newest, live, by active commit
    deleted_live(cli, process, share, vid, s5, "active-commit")
    pairs.every_pair([s1, s3, s4])
    assert pairs.restore(s5, "", fallback_to=s4)  # S5 was deleted: from S4, said so
    assert pairs.restore(s2, s4, fallback_to=s1)

    # the newest again, live, by pull: the active file outgrows the layer below it
    guest.scribble(rng, 4, (64 * KiB, 256 * KiB))
    s6 = pairs.take()
    for i in range(12):  # 12 MiB into S6's overlay, more than S4's holds
        guest.write(LOW - (12 - i) * MiB, MiB)
    deleted_live(cli, process, share, vid, s6, "pull")
    pairs.every_pair([s1, s3, s4])
    assert pairs.restore(s6, "", fallback_to=s4)

    # detached: an intermediate snapshot deleted offline; exports of the detached volume
    guest.flush()
    cli.json("detach", vid)
    assert cli.json("show", vid)["State"] == "available"
    cli.json("snapshot", "delete", s3)
    assert f"deleting snapshot {s3} of volume {vid} live" not in process.log_text()
    pairs.every_pair([s1, s4])
    assert pairs.restore(s3, "", fallback_to=s1)
    assert pairs.restore(s3, s4, fallback_to=s1)
    assert pairs.restore(s5, "", fallback_to=s4)  # the older tombstones still answer

    # attached again, the guest writing on
    cli.json("attach", vid, domain)
    guest.alias = str(live_disk(domain, vid).alias)
    guest.scribble(rng, 4, (64 * KiB, 256 * KiB))
    pairs.every_pair([s1, s4])
    assert pairs.restore(s2, "", fallback_to=s1)
    assert pairs.restore(s6, s4, fallback_to=s4)  # the same point in time: nothing changed
    print(f"\n{pairs.restores} restores checked")
    nothing_left(host)
