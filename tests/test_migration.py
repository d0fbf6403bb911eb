"""Live migration between two libvirt hosts on this machine (``tests/migration_fixtures``),
each with its own hostvold (one etcd, one share), under the real guest writing fsynced
records: the attachment follows the guest, the host it left refuses to change the volume,
and a failed migration leaves everything where the guest still runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from hostvold.server.bus import object_path
from tests.guest.image import GuestImage
from tests.guest.offline import check_image
from tests.guest.vm import GUEST_XML, RealGuest, boot, wait_for
from tests.migration_fixtures import ClusterHost, LibvirtHost
from tests.test_dbus import Cli
from tests.test_real_guest import attach_writing, file_of, holds, point_in_time, snapshot

pytestmark = pytest.mark.integration
Pair = tuple[ClusterHost, ClusterHost]


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, f"virsh {' '.join(args)}: {done.stderr}"
    return done


def migrate(guest: RealGuest, source: LibvirtHost, target: LibvirtHost, *extra: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """``virsh migrate --live --persistent --undefinesource`` (``--unsafe``: libvirt counts
    only network filesystems as shared). Into A, QEMU listens on A's veth address (A's
    hostname resolves to loopback, which B cannot reach)."""
    into = [] if target.root is not None else [
        "--migrateuri", f"tcp://{target.address}", "--listen-address", target.address]
    done = virsh(source.uri, "migrate", "--live", "--persistent", "--undefinesource",
                 "--unsafe", *into, *extra, guest.name, target.uri, check=check)
    if done.returncode == 0:
        guest.uri = target.uri
    return done


def owner(cli: Cli, vid: str) -> tuple[str, str]:
    """The volume's State and Host as that host's hostvold answers them: two property reads
    with dbus-send (a hostvolctl start alone takes longer than the second the acceptance
    allows on this loaded 2-core machine)."""
    answers = []
    for name in ("State", "Host"):
        done = subprocess.run(
            ["dbus-send", f"--bus={cli.address}", "--print-reply=literal",
             "--dest=org.hostvold1", object_path("volumes", vid),
             "org.freedesktop.DBus.Properties.Get", "string:org.hostvold1.Volume",
             f"string:{name}"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        words = done.stdout.split()
        answers.append(words[1] if len(words) > 1 else "")  # "variant VALUE"
    return answers[0], answers[1]


class GuestKeeper:
    """The module's guest, running on host A at the start of every test."""

    def __init__(self, image: GuestImage, hosts: tuple[LibvirtHost, LibvirtHost],
                 consoles: Path) -> None:
        self.image, self.hosts, self.consoles = image, hosts, consoles
        self.guest: RealGuest | None = None
        self.boots = 0

    def get(self) -> RealGuest:
        a = self.hosts[0]
        if self.guest is not None and self.guest.uri == a.uri and self.guest.is_running():
            return self.guest
        self.close()
        self.boots += 1
        name = f"hostvold-mig-{os.getpid()}-{self.boots}"
        self.guest = boot(self.image, name, self.consoles / f"{name}.console", a.uri)
        return self.guest

    def close(self) -> None:
        if self.guest is None:
            return
        for host in self.hosts:
            with contextlib.suppress(libvirt.libvirtError):
                conn = libvirt.open(host.uri)
                with contextlib.suppress(libvirt.libvirtError):
                    dom = conn.lookupByName(self.guest.name)
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefine()
                conn.close()
        self.guest = None


@pytest.fixture(scope="module")
def mig_keeper(guest_image: GuestImage, libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
               guest_mounts: Path) -> Iterator[GuestKeeper]:
    consoles = guest_mounts / "mig-consoles"
    consoles.mkdir(exist_ok=True)
    consoles.chmod(0o755)
    keeper = GuestKeeper(guest_image, libvirt_hosts, consoles)
    yield keeper
    keeper.close()


@pytest.fixture
def guest(mig_keeper: GuestKeeper) -> RealGuest:
    return mig_keeper.get()


def within(seconds: float, what: str, probe: Callable[[], bool]) -> float:
    started = time.monotonic()
    while not probe():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def refused(cli: Cli, host: str, *args: str) -> None:
    result = cli.run(*args)
    assert result.returncode != 0, f"{args} was accepted"
    assert "InUse" in result.stderr and host in result.stderr, result.stderr


# ---- a migration and back -----------------------------------------------------------------

def test_the_attachment_follows_the_guest(migration_cluster: Pair, guest: RealGuest,
                                          scratch: Path) -> None:
    a, b = migration_cluster
    vid = attach_writing(a.cli, guest)
    assert owner(a.cli, vid) == ("in-use", "host-a")
    migrate(guest, a.libvirt, b.libvirt)
    took = within(1.0, "B owns the volume", lambda: owner(b.cli, vid) == ("in-use", "host-b"))
    print(f"\nB showed the attachment {took:.2f} s after the migration returned")
    assert owner(a.cli, vid) == ("in-use", "host-b")
    guest.wait_acked(vid, guest.acked(vid) + 5)
    time.sleep(2)  # A's QEMU has gone by now (STOPPED_MIGRATED comes ~1.5 s late)
    assert owner(a.cli, vid) == ("in-use", "host-b"), "A freed the volume it no longer runs"
    refused(a.cli, "host-b", "delete", vid)
    refused(a.cli, "host-b", "snapshot", "create", vid)

    # on B: live snapshots and each way of deleting one, the data checked
    points = {}
    for _ in range(3):
        snap, before, after = snapshot(b.cli, guest, vid)
        holds(point_in_time(b.cli, snap["Id"], scratch, snap["Quiesced"]), before, after)
        points[snap["Id"]] = (before, after)
        guest.wait_acked(vid, after + 3)
    sids = list(points)
    guest.run("/bin/guestctl", "fill", vid, "6")
    for sid in (sids[2], sids[0], sids[1]):  # a pull, a commit, an active commit
        b.cli.json("snapshot", "delete", sid)
        del points[sid]
        for kept, (before, after) in points.items():
            holds(point_in_time(b.cli, kept, scratch, quiesced=True), before, after)
    assert b.cli.json("snapshots", vid) == []

    # and back to A
    migrate(guest, b.libvirt, a.libvirt)
    within(1.0, "A owns the volume again", lambda: owner(a.cli, vid) == ("in-use", "host-a"))
    time.sleep(2)
    assert owner(b.cli, vid) == ("in-use", "host-a")
    refused(b.cli, "host-a", "snapshot", "create", vid)
    snap, before, after = snapshot(a.cli, guest, vid)
    holds(point_in_time(a.cli, snap["Id"], scratch, snap["Quiesced"]), before, after)
    last = guest.acked(vid)
    assert guest.check(vid) >= last + 1
    guest.stop_writer(vid)
    a.cli.json("detach", vid)


# ---- a host crash: the guest started again elsewhere -----------------------------------------

def test_evacuation_after_a_host_crash(migration_cluster: Pair, guest: RealGuest,
                                       guest_image: GuestImage,
                                       daemon_factory: Callable[..., object],
                                       scratch: Path) -> None:
    a, b = migration_cluster
    vid = attach_writing(a.cli, guest)
    last = guest.acked(vid)
    assert a.process is not None
    a.process.proc.send_signal(signal.SIGKILL)  # the host dies: its daemon and its domain
    a.process.proc.wait(10)
    virsh(a.libvirt.uri, "destroy", guest.name)
    path, fmt = file_of(b.cli, vid)
    assert check_image(path, fmt, scratch, replay=True).records >= last + 1
    # the operator starts the guest on B from the same volume's active file
    xml = GUEST_XML.format(name=f"{guest.name}-b", kernel=guest_image.kernel,
                           initrd=guest_image.initrd, console=f"{guest.console}.b", params="")
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}' cache='none'/>"
            f"<source file='{path}'/><target dev='sda' bus='scsi'/><serial>{vid}</serial>"
            "</disk>")
    conn = libvirt.open(b.libvirt.uri)
    conn.createXML(xml.replace("<memballoon", disk + "<memballoon"), 0)
    conn.close()
    moved = RealGuest(f"{guest.name}-b", Path(f"{guest.console}.b"), b.libvirt.uri)
    try:
        took = within(1.0, "B owns the volume",
                      lambda: owner(b.cli, vid) == ("in-use", "host-b"))
        print(f"\nB owned the volume {took:.2f} s after the guest started there")
        moved.wait_acked(vid, last, seconds=120)  # the guest resumes after every record
        a.process = daemon_factory(a.config)  # type: ignore[assignment]
        assert owner(a.cli, vid) == ("in-use", "host-b")
        refused(a.cli, "host-b", "delete", vid)
        refused(a.cli, "host-b", "snapshot", "create", vid)
        b.cli.json("snapshot", "create", vid)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(b.libvirt.uri)
            conn.lookupByName(moved.name).destroy()
            conn.close()


# ---- migrations that fail, and a migration beside a block job -----------------------------

@pytest.mark.parametrize("how", ["domjobabort", "destination-killed"])
def test_a_failed_migration_leaves_the_guest_where_it_runs(
        migration_cluster: Pair, guest: RealGuest, scratch: Path, how: str) -> None:
    a, b = migration_cluster
    vid = attach_writing(a.cli, guest)
    result: list[subprocess.CompletedProcess[str]] = []
    # slowly (1 MiB/s): the migration runs long enough to be seen and cut
    mover = threading.Thread(target=lambda: result.append(migrate(
        guest, a.libvirt, b.libvirt, "--bandwidth", "1", check=False)))
    mover.start()
    try:
        within(30, "the migration to start on B",
               lambda: virsh(b.libvirt.uri, "domstate", guest.name, check=False)
               .returncode == 0)
        within(5, "the volume to show as migrating",
               lambda: owner(a.cli, vid)[0] == "migrating")
        assert owner(b.cli, vid)[0] == "migrating"
        for cli in (a.cli, b.cli):  # data-changing calls refused on both hosts
            denied = cli.run("snapshot", "create", vid)
            assert denied.returncode != 0 and "migrat" in denied.stderr, denied.stderr
        if how == "domjobabort":
            virsh(a.libvirt.uri, "domjobabort", guest.name)
        else:
            os.kill(b.libvirt.pid_of_qemu(guest.name), signal.SIGKILL)
    finally:
        mover.join(300)
    assert result and result[0].returncode != 0, "the migration was meant to fail"
    assert guest.uri == a.libvirt.uri
    for cli in (a.cli, b.cli):
        within(5, "the volume back in use on A", lambda c=cli: owner(c, vid) == (
            "in-use", "host-a"))
    guest.wait_acked(vid, guest.acked(vid) + 5)
    snap, before, after = snapshot(a.cli, guest, vid)
    holds(point_in_time(a.cli, snap["Id"], scratch, snap["Quiesced"]), before, after)
    a.cli.json("snapshot", "delete", snap["Id"])
    last = guest.acked(vid)
    assert guest.check(vid) >= last + 1  # the guest reads back every record it acknowledged
    guest.stop_writer(vid)
    a.cli.json("detach", vid)


def test_a_migration_beside_a_live_delete(migration_cluster: Pair, guest: RealGuest) -> None:
    """A snapshot delete's block job (a commit of 32 MiB below the active file, slowed)
    runs: libvirt refuses the migration, and the delete ends as it would have."""
    a, b = migration_cluster
    vid = attach_writing(a.cli, guest, "96M")
    sid = a.cli.json("snapshot", "create", vid)["Id"]
    guest.run("/bin/guestctl", "fill", vid, "32", timeout=180)
    a.cli.json("snapshot", "create", vid)  # sid's 32 MiB now lie below the active file
    conn = libvirt.open(a.libvirt.uri)
    dom = conn.lookupByName(guest.name)
    target = a.cli.json("show", vid)["Attachment"][1]
    caught = threading.Event()

    def slow_down() -> None:  # the test's own watch: the job is slowed the moment it starts
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.blockJobInfo(target, 0):
                    dom.blockJobSetSpeed(target, 1, 0)  # MiB/s
                    caught.set()
                    return
            time.sleep(0.002)

    watcher = threading.Thread(target=slow_down)
    watcher.start()
    job = a.cli.json("--no-wait", "snapshot", "delete", sid)["job"]
    watcher.join()
    conn.close()
    assert caught.is_set(), f"no block job seen: {a.cli.json('job', job)}"
    done = migrate(guest, a.libvirt, b.libvirt, check=False)
    assert done.returncode != 0 and "block job" in done.stderr.lower(), done.stderr
    print(f"\nthe migration was refused: {done.stderr.strip()}")
    with contextlib.suppress(libvirt.libvirtError):  # full speed again
        libvirt.open(a.libvirt.uri).lookupByName(guest.name).blockJobSetSpeed(target, 0, 0)
    wait_for("the delete to end", lambda: a.cli.json("job", job)["State"] != "running", 120)
    assert a.cli.json("job", job)["State"] == "completed"
    assert len(a.cli.json("snapshots", vid)) == 1 and owner(a.cli, vid) == ("in-use", "host-a")
    last = guest.acked(vid)
    assert guest.check(vid) >= last + 1  # the guest reads back every record it acknowledged
    guest.stop_writer(vid)
    a.cli.json("detach", vid)


def test_a_hostvold_down_during_the_migration(migration_cluster: Pair, guest: RealGuest,
                                              daemon_factory: Callable[..., object]) -> None:
    a, b = migration_cluster
    vid = attach_writing(a.cli, guest)
    assert b.process is not None
    b.process.stop()
    migrate(guest, a.libvirt, b.libvirt)
    time.sleep(2)  # A's QEMU goes; A must not free the volume it cannot see anywhere
    assert owner(a.cli, vid)[0] != "available"
    refused_or_migrating = a.cli.run("delete", vid)
    assert refused_or_migrating.returncode != 0
    b.process = daemon_factory(b.config)  # type: ignore[assignment]  (returns at READY)
    within(1.0, "B holds the attachment", lambda: owner(b.cli, vid) == ("in-use", "host-b"))
    within(2.0, "A sees it", lambda: owner(a.cli, vid) == ("in-use", "host-b"))
    guest.wait_acked(vid, guest.acked(vid) + 5)
    last = guest.acked(vid)
    assert guest.check(vid) >= last + 1  # the guest reads back every record it acknowledged
    guest.stop_writer(vid)
    b.cli.json("detach", vid)
    within(2.0, "A sees it detached", lambda: owner(a.cli, vid) == ("available", ""))
