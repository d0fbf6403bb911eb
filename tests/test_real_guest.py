"""hostvold under a real Linux guest: ext4 on each volume, the guest agent, a writer of
numbered fsynced records and a latency probe (``tests/guest``). What the guest
acknowledged is read from its console; what a snapshot, clone or export holds is read from
a copy with e2fsprogs. One guest boots per module (again after a test destroyed it)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.conftest import DaemonProcess, Host
from tests.guest.offline import FsCheck, check_image
from tests.guest.vm import RealGuest
from tests.guest_fixtures import mount_base_under_guest_mounts
from tests.test_dbus import Cli, with_bus
from tests.test_live import LIVE_CRASHES, live_disk

pytestmark = pytest.mark.integration
Live = Callable[..., tuple[Cli, DaemonProcess, Host]]


shared_base = pytest.fixture(name="shared_base")(mount_base_under_guest_mounts)


def attach_writing(cli: Cli, guest: RealGuest, size: str = "64M") -> str:
    """A new volume attached to the guest, its writer past its fifth record."""
    vid = cli.json("create", size)["Id"]
    mark = guest.offset()
    cli.json("attach", vid, guest.name)
    guest.wait_acked(vid, 5, seconds=120, since=mark)
    return vid


def file_of(cli: Cli, vid: str) -> tuple[Path, str]:
    """The volume's active file and that file's own format."""
    info = cli.json("show", vid)["ConnectionInfo"]
    return Path(info["path"]), info["format"]


def snapshot(cli: Cli, guest: RealGuest, vid: str) -> tuple[dict[str, Any], int, int]:
    """A live snapshot; with the last record acknowledged before the call and after it."""
    before = guest.acked(vid)
    snap = cli.json("snapshot", "create", vid)
    return snap, before, guest.acked(vid)


def holds(fs: FsCheck, before: int, after: int | None = None) -> None:
    """Every record acknowledged before the point in time is there, none missing in
    between, and (``after``) none acknowledged after the point in time: the writer may
    have had one record written but not yet acknowledged when it was taken."""
    assert fs.stray == 0, f"a hole before {fs.stray} later records"
    assert fs.records >= before + 1, f"{fs.records} records, {before} was acknowledged"
    if after is not None:
        assert fs.records <= after + 2, f"{fs.records} records, {after} acknowledged after"


def point_in_time(cli: Cli, sid: str, scratch: Path, quiesced: bool) -> FsCheck:
    """The snapshot made a standalone volume, checked on a copy, then deleted."""
    made = cli.json("snapshot", "create-volume", sid)
    path, fmt = file_of(cli, made["Id"])
    fs = check_image(path, fmt, scratch, replay=not quiesced)
    cli.json("delete", made["Id"])
    if quiesced:
        assert not fs.needed_recovery, "a quiesced snapshot needed a journal replay"
    assert fs.fsck_clean, "e2fsck found damage"
    return fs


def finish(cli: Cli, guest: RealGuest, vid: str) -> int:
    """The guest reads every acknowledged record back from the disk; then its writer
    stops and the volume is detached. Returns the last acknowledged record."""
    last = guest.acked(vid)
    assert guest.check(vid) >= last + 1, "the guest lost an acknowledged record"
    last = guest.stop_writer(vid)
    cli.json("detach", vid)
    return last


def wait_until(what: str, predicate: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---- quiesce -----------------------------------------------------------------------------

def test_quiesced_snapshots_are_clean_filesystems(live: Live, real_guest: RealGuest,
                                                  scratch: Path) -> None:
    cli, _, _ = live("[libvirt]\nquiesce = require\n")
    vid = attach_writing(cli, real_guest)
    for _ in range(2):
        snap, before, after = snapshot(cli, real_guest, vid)
        assert snap["Quiesced"] is True
        holds(point_in_time(cli, snap["Id"], scratch, quiesced=True), before, after)
        real_guest.wait_acked(vid, after + 3)
    finish(cli, real_guest, vid)


def test_crash_consistent_snapshot_replays_to_every_acknowledged_record(
        live: Live, real_guest: RealGuest, scratch: Path) -> None:
    cli, _, _ = live("[libvirt]\nquiesce = never\n")
    vid = attach_writing(cli, real_guest)
    snap, before, after = snapshot(cli, real_guest, vid)
    assert snap["Quiesced"] is False
    fs = point_in_time(cli, snap["Id"], scratch, quiesced=False)
    holds(fs, before, after)
    print(f"\ncrash-consistent snapshot: journal replay needed: {fs.needed_recovery}, "
          f"{fs.records} records ({before} acknowledged before, {after} after)")
    finish(cli, real_guest, vid)


@pytest.mark.parametrize("policy", ["require", "try"])
def test_a_hung_agent_never_leaves_the_guest_frozen(live: Live, real_guest: RealGuest,
                                                    scratch: Path, policy: str) -> None:
    """The agent is SIGSTOPped: the freeze fails within quiesce_timeout (require: refused
    with QuiesceFailed; try: a crash-consistent snapshot, said so). The freeze libvirt
    gave up on still waits in the agent's channel; when the agent wakes it freezes the
    guest, and hostvold's thaw, asked until answered, lands after it."""
    cli, process, _ = live(f"[libvirt]\nquiesce = {policy}\nquiesce_timeout = 2\n")
    vid = attach_writing(cli, real_guest)
    hang = 10
    real_guest.hang_agent(hang)
    hung_at = time.monotonic()
    time.sleep(0.5)  # the agent is stopped from inside: let it happen
    mark_before = real_guest.acked(vid)
    took, error, answer = cli.create_snapshot_timed(vid)  # the daemon's time, no client's
    assert took < 2 + 1.5, f"the freeze took {took:.1f} s against a 2 s timeout"
    if policy == "require":
        assert error == "org.hostvold1.Error.QuiesceFailed", (error, answer)
        assert cli.json("snapshots", vid) == []
    else:
        assert error == "", (error, answer)
        [made] = cli.json("snapshots", vid)  # the one just made (its object path came back)
        assert made["Quiesced"] is False
        assert "crash-consistent snapshot" in process.log_text()
        # crash-consistent, taken while the agent hung: whole after a journal replay
        holds(point_in_time(cli, made["Id"], scratch, quiesced=False), mark_before)
    mark = real_guest.acked(vid)
    real_guest.wait_acked(vid, mark + 3, seconds=10)  # not frozen while the agent is hung
    # the agent wakes up and carries out the stale freeze; the thaw must follow it
    wait_until("the agent to wake", lambda: time.monotonic() > hung_at + hang + 1, hang + 5)
    mark = real_guest.acked(vid)
    real_guest.wait_acked(vid, mark + 10, seconds=30)
    assert not real_guest.frozen()
    if policy == "try":  # the agent answers again: the next snapshot is quiesced
        snap, before, after = snapshot(cli, real_guest, vid)
        assert snap["Quiesced"] is True
        holds(point_in_time(cli, snap["Id"], scratch, quiesced=True), before, after)
    finish(cli, real_guest, vid)


# ---- every live path with the writer going ----------------------------------------------

def test_the_writer_goes_through_every_live_path(live: Live, real_guest: RealGuest,
                                                 scratch: Path, tmp_path: Path) -> None:
    """Snapshot create; delete by commit below the active file, by pull and by active
    commit; clone and export of the attached volume; online extend with the filesystem
    grown by the guest. Each snapshot's point in time is checked when taken and again
    after every delete; at the end the guest reads back every record it acknowledged."""
    cli, process, _ = live("[libvirt]\nquiesce = try\n")
    vid = attach_writing(cli, real_guest)
    points: dict[str, tuple[int, int]] = {}

    def take() -> str:
        snap, before, after = snapshot(cli, real_guest, vid)
        assert snap["Quiesced"] is True
        holds(point_in_time(cli, snap["Id"], scratch, quiesced=True), before, after)
        points[snap["Id"]] = (before, after)
        real_guest.wait_acked(vid, after + 5)
        return str(snap["Id"])

    def delete(sid: str, strategy: str) -> None:
        cli.json("snapshot", "delete", sid)
        assert f"deleting snapshot {sid} of volume {vid} live by {strategy}" \
            in process.log_text()
        del points[sid]
        for kept, (before, after) in points.items():  # the others' points in time hold
            holds(point_in_time(cli, kept, scratch, quiesced=True), before, after)
        real_guest.wait_acked(vid, real_guest.acked(vid) + 5)

    s1 = take()
    s2 = take()
    s3 = take()
    real_guest.run("/bin/guestctl", "fill", vid, "6")  # the active file outgrows s3's base
    delete(s3, "pull")
    delete(s1, "commit")
    delete(s2, "active-commit")
    assert cli.json("snapshots", vid) == []

    before = real_guest.acked(vid)
    clone = cli.json("clone", vid)
    path, fmt = file_of(cli, clone["Id"])
    clone_fs = check_image(path, fmt, scratch)
    assert clone_fs.fsck_clean and not clone_fs.needed_recovery  # quiesced (try, agent up)
    holds(clone_fs, before)
    cli.json("delete", clone["Id"])

    before = real_guest.acked(vid)
    exported = tmp_path / "exported.raw"
    cli.json("export", vid, str(exported))
    export_fs = check_image(exported, "raw", scratch)
    assert export_fs.fsck_clean
    holds(export_fs, before)

    cli.json("extend", vid, "96M")
    code, df = real_guest.run("/bin/guestctl", "resize", vid)
    assert code == 0, df
    assert int(df.split()[1]) > 80 * 1024, f"the guest's filesystem did not grow: {df}"
    real_guest.wait_acked(vid, real_guest.acked(vid) + 10)

    last = finish(cli, real_guest, vid)
    path, fmt = file_of(cli, vid)
    final = check_image(path, fmt, scratch)
    assert final.fsck_clean and not final.needed_recovery  # unmounted cleanly
    holds(final, last)


# ---- the daemon killed at every named live step, the writer going ------------------------

CREATE_POINTS = [("create", "-", f"live-create-snapshot:{step}")
                 for step in ("intent", "overlay", "frozen", "switched", "info")]
CRASHES = [(op, strategy, point, fate)
           for op, strategy, point in CREATE_POINTS + [c for c in LIVE_CRASHES
                                                       if c[0] == "delete"]
           for fate in ("alive", "destroyed")]


@pytest.mark.parametrize(("operation", "strategy", "point", "fate"), CRASHES,
                         ids=[f"{p}[{s}]-{f}" for _, s, p, f in CRASHES])
def test_live_crash_with_the_writer_going(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess], shared_base: Path,
        real_guest: RealGuest, scratch: Path, operation: str, strategy: str, point: str,
        fate: str) -> None:
    """The daemon dies at a recorded step while the guest writes; the domain lives on or is
    destroyed before the next start. No acknowledged record is lost: read back by the guest
    when it lives, from the volume's files when it was destroyed."""
    address = bus_factory("hostvold")
    host = host_factory(512, extra="[libvirt]\nquiesce = try\n",
                        mount_point_base=shared_base / str(time.monotonic_ns()))
    config = with_bus(host, address)
    setup = daemon_factory(config)
    cli = Cli(address)
    vid = attach_writing(cli, real_guest)
    snapshots = []
    if operation == "delete":  # pull: the active file outgrows the layer below it
        count = 1 if strategy == "active-commit" else 2
        for _ in range(count):
            snapshots.append(cli.json("snapshot", "create", vid)["Id"])
            real_guest.wait_acked(vid, real_guest.acked(vid) + 3)
        if strategy == "pull":
            real_guest.run("/bin/guestctl", "fill", vid, "6")
    assert setup.stop() == 0
    crashing = daemon_factory(config, env={"HOSTVOLD_CRASH_AT": point})
    if operation == "create":
        cli.run("snapshot", "create", vid)
    else:
        cli.run("snapshot", "delete", snapshots[0] if strategy == "commit" else snapshots[-1])
    assert crashing.proc.wait(60) == 86, f"{point} not reached: {crashing.log_text()[-2000:]}"
    if operation == "delete":
        share = Path(live_disk(real_guest.name, vid).source).parent
        recorded = json.loads((share / f"volume-{vid}.meta").read_text())["operation"]
        assert recorded["strategy"] == strategy
    if point.endswith(":frozen"):  # died between freeze and thaw: the next start thaws
        assert real_guest.frozen()
    else:
        real_guest.wait_acked(vid, real_guest.acked(vid) + 3)  # the guest writes on meanwhile
    if fate == "destroyed":
        last = real_guest.acked(vid)
        conn = libvirt.open("qemu:///system")
        conn.lookupByName(real_guest.name).destroy()
        conn.close()
    daemon_factory(config)  # recovery runs before READY
    shown = cli.json("show", vid)
    assert shown["Problems"] == [], shown["Problems"]
    if fate == "alive":
        assert shown["State"] == "in-use"
        conn = libvirt.open("qemu:///system")
        target = live_disk(real_guest.name, vid).target
        assert conn.lookupByName(real_guest.name).blockJobInfo(target, 0) == {}
        conn.close()
        assert not real_guest.frozen()
        real_guest.wait_acked(vid, real_guest.acked(vid) + 5)
        snap, before, after = snapshot(cli, real_guest, vid)  # usable for the next one
        holds(point_in_time(cli, snap["Id"], scratch, quiesced=snap["Quiesced"]), before, after)
        finish(cli, real_guest, vid)
    else:
        assert shown["State"] == "available"
        path, fmt = file_of(cli, vid)
        holds(check_image(path, fmt, scratch, replay=True), last)
