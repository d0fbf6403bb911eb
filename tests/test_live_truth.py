"""Attached volumes act on libvirt's truth, never on a cached belief (issue 8): domains
started, destroyed and defined behind hostvold's back, the daemon dying around a pivot,
cancelled block jobs, a guest left frozen. Real libvirtd, real TCG domains, guest writes
through the running QEMU's own block layer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.conftest import DaemonProcess, Host
from tests.live_fixtures import DOMAIN_XML
from tests.test_dbus import Cli
from tests.test_live import (
    attached_volume,
    guest_flush,
    live_disk,
    monitor_write,
    reads,
)

pytestmark = pytest.mark.integration
VIRSH = ["virsh", "-c", "qemu:///system"]


def virsh(*args: str) -> str:
    return subprocess.run([*VIRSH, *args], check=True, capture_output=True, text=True).stdout


def wait_for(what: str, predicate: Callable[[], bool], seconds: float = 10) -> float:
    """Seconds until ``predicate`` holds (the test looks; hostvold itself never polls)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, f"not within {seconds} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def on_share(share: Path, vid: str) -> list[str]:
    return sorted(p.name for p in share.iterdir() if p.name.startswith(f"volume-{vid}")
                  and not p.name.endswith((".info", ".meta")))


def file_chain(path: Path, fmt: str) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "-f", fmt, "--output=json",
                          "--backing-chain", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [Path(layer["filename"]).name for layer in json.loads(out)]


def check_files(share: Path, vid: str, final: list[tuple[int, int]],
                snapshots: dict[str, list[tuple[int, int]]]) -> None:
    """From the files alone: the info file names a chain that holds every file of the
    volume (no orphan), the active file reads ``final`` and each snapshot its own data."""
    info = json.loads((share / f"volume-{vid}.info").read_text())
    assert sorted(info) == sorted(["active", *snapshots])
    active_fmt = "raw" if info["active"] == f"volume-{vid}" else "qcow2"
    chain = file_chain(share / info["active"], active_fmt)
    assert on_share(share, vid) == sorted(chain), "an orphan or a missing file"
    assert reads(str(share / info["active"]), active_fmt, final)
    for sid, expected in snapshots.items():
        data = chain[chain.index(info[sid]) + 1]
        assert reads(str(share / data), "raw" if data == chain[-1] else "qcow2", expected), sid


@pytest.fixture
def persistent(libvirtd: str, shared_base: Path) -> Iterator[Callable[..., str]]:
    """Factory of persistent domains: ``persistent(disk_xml, start=True)``."""
    conn = libvirt.open(libvirtd)
    made: list[libvirt.virDomain] = []

    def factory(disk: str = "", start: bool = True) -> str:
        name = f"hostvold-truth-{os.getpid()}-{time.monotonic_ns() % 1000000}"
        xml = DOMAIN_XML.format(name=name).replace("</devices>", f"{disk}</devices>")
        dom = conn.defineXML(xml)
        made.append(dom)
        if start:
            dom.create()
        return name

    yield factory
    for dom in made:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.managedSaveRemove(0)
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
    conn.close()


def test_domain_started_outside_hostvold(live: Callable[..., tuple[Cli, DaemonProcess, Host]],
                                         persistent: Callable[..., str], tmp_path: Path) -> None:
    """Sequence 1 of the issue: attach to a persistent domain, destroy it, start it again
    with virsh. hostvold sees the start and works live from then on; nothing acts offline
    under the running guest."""
    cli, _, _ = live("[libvirt]\nquiesce = never\n")
    domain = persistent()
    vid = cli.json("create", "16M")["Id"]
    cli.json("attach", vid, domain)
    monitor_write(domain, live_disk(domain, vid).alias, 0x51, 0)
    virsh("destroy", domain)
    wait_for("freed after destroy", lambda: cli.json("show", vid)["State"] == "available")
    virsh("start", domain)  # QEMU opens the volume again from the definition
    seconds = wait_for("in-use after an outside start",
                       lambda: cli.json("show", vid)["State"] == "in-use")
    print(f"\nin-use {seconds * 1000:.0f} ms after virsh start returned")
    assert seconds < 1.0
    shown = cli.json("show", vid)
    disk = live_disk(domain, vid)
    assert shown["Attachment"] == [domain, disk.target]
    share = Path(disk.source).parent
    alias = disk.alias

    s1 = cli.json("snapshot", "create", vid)["Id"]  # live: the domain switches
    assert live_disk(domain, vid).source.endswith(s1)
    monitor_write(domain, alias, 0x52, 2)
    s2 = cli.json("snapshot", "create", vid)["Id"]
    assert live_disk(domain, vid).source.endswith(s2)
    monitor_write(domain, alias, 0x53, 4)

    for refused, words in ((["revert", vid, s2], "InUse"), (["delete", vid], "InUse"),
                           (["attach", vid, domain], "InUse")):
        result = cli.run(*refused)
        assert result.returncode == 1 and words in result.stderr and domain in result.stderr, \
            (refused, result.stderr)
    clone = cli.json("clone", vid)
    export = tmp_path / "export.raw"
    assert cli.json("export", vid, str(export))["State"] == "completed"
    newest = [(0x51, 0), (0x52, 2), (0x53, 4)]
    assert reads(str(share / f"volume-{clone['Id']}"), "raw", newest)
    assert reads(str(export), "raw", newest)
    assert cli.json("snapshot", "delete", s1)["State"] == "completed"  # live commit
    guest_flush(domain, alias)
    check_files(share, vid, newest, {s2: [(0x51, 0), (0x52, 2), (0, 4)]})
    assert Path(live_disk(domain, vid).source).name == json.loads(
        (share / f"volume-{vid}.info").read_text())["active"]
    qemu_pid = int((Path("/run/libvirt/qemu") / f"{domain}.pid").read_text())
    fds = os.listdir(f"/proc/{qemu_pid}/fd")
    assert not any("(deleted)" in os.readlink(f"/proc/{qemu_pid}/fd/{fd}") for fd in fds
                   if os.path.exists(f"/proc/{qemu_pid}/fd/{fd}"))


def test_defined_domain_follows_offline_snapshots(
        live: Callable[..., tuple[Cli, DaemonProcess, Host]], persistent: Callable[..., str],
        shared_base: Path) -> None:
    """A shut-off domain whose definition names the volume: an offline snapshot create and
    a delete of the newest snapshot keep the definition on the active file; started
    afterwards the domain runs on the newest data. Deleting the volume is refused."""
    cli, _, host = live("[libvirt]\nquiesce = never\n")
    vid = cli.json("create", "16M")["Id"]
    share = next(host.mount_point_base.iterdir())
    base = share / f"volume-{vid}"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", str(base)],
                   check=True, capture_output=True)
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            f"<source file='{base}'/><target dev='sdb' bus='scsi'/><serial>{vid}</serial>"
            "</disk>")
    domain = persistent(disk, start=False)
    refused = cli.run("delete", vid)
    assert refused.returncode == 1 and "InUse" in refused.stderr and domain in refused.stderr
    s1 = cli.json("snapshot", "create", vid)["Id"]
    defined = virsh("dumpxml", "--inactive", domain)
    assert f"volume-{vid}.{s1}" in defined and "type='qcow2'" in defined, defined
    s2 = cli.json("snapshot", "create", vid)["Id"]
    assert cli.json("snapshot", "delete", s2)["State"] == "completed"  # the newest: active moves
    assert f"volume-{vid}.{s1}'" in virsh("dumpxml", "--inactive", domain)
    virsh("start", domain)
    wait_for("in-use after start", lambda: cli.json("show", vid)["State"] == "in-use")
    live_source = live_disk(domain, vid)
    assert live_source.source == str(share / f"volume-{vid}.{s1}")
    monitor_write(domain, live_source.alias, 0x62, 2)
    guest_flush(domain, live_source.alias)
    check_files(share, vid, [(0x61, 0), (0x62, 2)], {s1: [(0x61, 0), (0, 2)]})


# ---- the daemon dies around a live delete --------------------------------------------------

# The steps every strategy shares (intent, job-started, job-done, gone-from-chain, info)
# run with the real guest's writer going, the domain alive and destroyed, in
# tests/test_real_guest.py; here the two steps of the pivot, which only an active commit has.
DELETE_POINTS = ["pivot-recorded", "pivoted"]
CASES = [("active-commit", point, fate) for point in DELETE_POINTS
         for fate in ("alive", "destroyed")]


@pytest.mark.parametrize(("strategy", "point", "fate"), CASES,
                         ids=[f"{s}-{p}-{f}" for s, p, f in CASES])
def test_crash_around_a_live_delete(host_factory: Callable[..., Host],
                                    bus_factory: Callable[[str], str],
                                    daemon_factory: Callable[..., DaemonProcess],
                                    shared_base: Path, domain: str, strategy: str, point: str,
                                    fate: str) -> None:
    """The daemon dies at a recorded step of a live delete, the guest writes after it,
    and the domain lives on or is destroyed before the next start. No guest write is lost;
    where the record cannot tell (a pivot asked for, its outcome unknown, the domain gone),
    every file is kept, the volume says so, and repair settles it by the operator's choice."""
    config, cli, setup, vid, alias = attached_volume(host_factory, bus_factory, daemon_factory,
                                                     shared_base, domain, "32M")
    monitor_write(domain, alias, 0x41, 0)
    monitor_write(domain, alias, 0x41, 2)
    s1 = cli.json("snapshot", "create", vid)["Id"]
    monitor_write(domain, alias, 0x42, 0)
    monitor_write(domain, alias, 0x42, 4)
    if strategy == "active-commit":
        monitor_write(domain, alias, 0x42, 20, 8)  # base bigger than top: commit, not pull
    s2 = cli.json("snapshot", "create", vid)["Id"]
    monitor_write(domain, alias, 0x43, 0)
    monitor_write(domain, alias, 0x43, 6)  # the active overlay holds data
    if strategy == "pull":
        monitor_write(domain, alias, 0x43, 10, 8)  # top bigger than base: a pull
    doomed, kept = (s1, s2) if strategy == "commit" else (s2, s1)
    assert setup.stop() == 0
    crashing = daemon_factory(config, env={"HOSTVOLD_CRASH_AT": f"live-delete-snapshot:{point}"})
    cli.run("snapshot", "delete", doomed)
    assert crashing.proc.wait(60) == 86, crashing.log_text()[-2000:]
    share = Path(live_disk(domain, vid).source).parent
    recorded = json.loads((share / f"volume-{vid}.meta").read_text())["operation"]
    assert recorded["strategy"] == strategy
    monitor_write(domain, alias, 0x4f, 0)  # the guest goes on writing after the crash
    monitor_write(domain, alias, 0x4f, 8)
    if fate == "destroyed":
        virsh("destroy", domain)
    daemon_factory(config)  # recovery runs before READY
    final = [(0x4f, 0), (0x41, 2), (0x42, 4), (0x43, 6), (0x4f, 8)]
    if strategy == "commit":  # S2 remains: its data is base + S1's overlay
        kept_data = [(0x42, 0), (0x41, 2), (0x42, 4), (0, 6)]
    else:  # S1 remains: its data is the base file
        kept_data = [(0x41, 0), (0x41, 2), (0, 4)]
    shown = cli.json("show", vid)
    if shown["Problems"]:  # only an undecided pivot may leave a question
        assert point == "pivot-recorded" and fate == "destroyed", shown["Problems"]
        assert "ambiguous-pivot" in shown["Problems"][0]
        print(f"\nundecided pivot: {shown['Problems'][0]}")
        asked = cli.run("repair", vid)
        assert asked.returncode == 1 and "--choose" in asked.stderr, asked.stderr
        assert len(on_share(share, vid)) == 3  # every file kept meanwhile
        cli.json("repair", vid, "--choose", "overlay")  # the truth: the crash came before it
        assert cli.json("show", vid)["Problems"] == []
    if fate == "alive":
        conn = libvirt.open("qemu:///system")
        assert conn.lookupByName(domain).blockJobInfo(live_disk(domain, vid).target, 0) == {}
        conn.close()
        guest_flush(domain, alias)
        assert shown["State"] == "in-use"
    else:
        assert cli.json("show", vid)["State"] == "available"
    check_files(share, vid, final, {kept: kept_data})
    assert [s["Id"] for s in cli.json("snapshots", vid)] == [kept]
    cli.json("snapshot", "create", vid)  # usable for the next operation


# ---- cancel --------------------------------------------------------------------------------

def delete_in_background(cli: Cli, domain: str, vid: str,
                         sid: str) -> tuple[str, libvirt.virConnect, libvirt.virDomain, str]:
    """A snapshot delete started without waiting, once its block job runs in QEMU:
    (job path, connection, domain, disk target)."""
    job = cli.json("--no-wait", "snapshot", "delete", sid)["job"]
    conn = libvirt.open("qemu:///system")
    dom = conn.lookupByName(domain)
    target = live_disk(domain, vid).target
    wait_for("the block job", lambda: bool(dom.blockJobInfo(target, 0))
             or cli.json("job", job)["State"] != "running", 30)
    with contextlib.suppress(libvirt.libvirtError):  # slow storage: still running when cancelled
        dom.blockJobSetSpeed(target, 16, 0)  # MiB/s
    return job, conn, dom, target


@pytest.mark.parametrize("strategy", ["commit", "active-commit", "pull"])
def test_cancel_of_a_live_delete(host_factory: Callable[..., Host],
                                 bus_factory: Callable[[str], str],
                                 daemon_factory: Callable[..., DaemonProcess],
                                 shared_base: Path, domain: str, strategy: str) -> None:
    """Job.Cancel while the block job runs: the job is aborted (none left in QEMU), the
    chain is consistent and every write intact; a cancelled pull leaves the snapshot, a
    cancelled commit is finished by the next delete."""
    config, cli, _, vid, alias = attached_volume(host_factory, bus_factory, daemon_factory,
                                                 shared_base, domain, "512M", 1280)
    monitor_write(domain, alias, 0x41, 0)
    s1 = cli.json("snapshot", "create", vid)["Id"]
    s2 = None
    data = [(0x43, 0), (0x42, 2)]
    if strategy == "commit":  # S1's overlay (400 MiB) into the base, below the active file
        monitor_write(domain, alias, 0x42, 2, 400)
        s2 = cli.json("snapshot", "create", vid)["Id"]
    elif strategy == "active-commit":  # the active file (400 MiB) into the base
        monitor_write(domain, alias, 0x42, 2, 400)
    else:  # S1's overlay (250 MiB) pulled into a bigger active file
        monitor_write(domain, alias, 0x42, 2, 250)
        s2 = cli.json("snapshot", "create", vid)["Id"]
        monitor_write(domain, alias, 0x43, 256, 255)
        data.append((0x43, 256))
    monitor_write(domain, alias, 0x43, 0)
    doomed = s2 if strategy == "pull" else s1
    assert doomed is not None
    job, conn, dom, target = delete_in_background(cli, domain, vid, doomed)
    cancelled = cli.run("job", job, "--cancel")
    state = wait_for("the job to end", lambda: cli.json("job", job)["State"] != "running", 60)
    del state
    result = cli.json("job", job)
    print(f"\n{strategy}: cancel answered {cancelled.returncode}, job {result['State']}")
    assert result["State"] == "cancelled", (result, cancelled.stderr)
    assert dom.blockJobInfo(target, 0) == {}  # nothing left running unfollowed
    guest_flush(domain, alias)
    share = Path(live_disk(domain, vid).source).parent
    if strategy == "pull":  # the snapshot is as it was
        assert s2 is not None
        assert sorted(s["Id"] for s in cli.json("snapshots", vid)) == sorted([s1, s2])
        check_files(share, vid, data, {s1: [(0x41, 0), (0, 2)],
                                       s2: [(0x41, 0), (0x42, 2)]})
        assert cli.json("show", vid)["State"] == "in-use"
    else:  # the snapshot's data was already being merged: a retry finishes the delete
        assert cli.json("snapshot", "delete", doomed)["State"] == "completed"
        guest_flush(domain, alias)
        check_files(share, vid, data, {s2: [(0x41, 0), (0x42, 2)]} if s2 else {})
    assert dom.blockJobInfo(live_disk(domain, vid).target, 0) == {}
    conn.close()
    del config


# ---- a guest left frozen -------------------------------------------------------------------

class _AgentDomain:
    """A running domain with a guest agent, as libvirt's binding shows it: enough for
    the recovery of a live snapshot create (no real guest agent runs in a TCG test VM)."""

    def __init__(self, source: str, volume_id: str) -> None:
        self.source = source
        self.volume_id = volume_id
        self.thawed = 0

    def name(self) -> str:
        return "agent-domain"

    def UUIDString(self) -> str:
        return "00000000-0000-4000-8000-000000000001"

    def isActive(self) -> int:
        return 1

    def XMLDesc(self, flags: int = 0) -> str:
        return (f"<domain><devices><disk type='file' device='disk'>"
                f"<driver name='qemu' type='raw'/><source file='{self.source}'/>"
                f"<target dev='sdb' bus='scsi'/><serial>{self.volume_id}</serial>"
                "</disk></devices></domain>")

    def fsThaw(self) -> int:
        self.thawed += 1
        return 1


async def test_recovery_thaws_a_guest_frozen_by_a_dead_daemon(
        host_factory: Callable[..., Host]) -> None:
    """The daemon died between freeze and thaw of a quiesced snapshot: recovery thaws the
    guest, then decides from the live chain (not switched: the overlay goes)."""
    from hostvold.ops.live import LiveVolumes
    from hostvold.virt.hypervisor import Hypervisor

    host = host_factory(64)
    volumes = await host.start()
    meta = await volumes.create_volume(size=1 << 20)
    files = volumes.store.files_of(meta)
    fake = _AgentDomain(str(files.base), meta.id)

    class FakeHypervisor(Hypervisor):
        async def lookup(self, name: str) -> Any:
            return fake

        async def domains_by_state(self) -> tuple[list[Any], list[Any]]:
            return [fake], []

    hypervisor = FakeHypervisor("test:///default")
    live = LiveVolumes(host.config, volumes.store, hypervisor)
    overlay = files.overlay_name("5a5a5a5a-0000-4000-8000-00000000f00d")
    (files.directory / overlay).write_bytes(b"")
    meta = await volumes.store.record(files, meta.evolve(operation={
        "name": "live-create-snapshot", "snapshot": "5a5a5a5a-0000-4000-8000-00000000f00d",
        "overlay": overlay, "domain": "agent-domain", "target": "sdb", "step": "switch",
        "temporary": False}))
    await live._recover_create(files, meta)
    assert fake.thawed == 1
    assert not (files.directory / overlay).exists()
    assert volumes.store.get_volume(meta.id).operation is None
    hypervisor.executor.shutdown()


def test_sigterm_during_an_active_commit(host_factory: Callable[..., Host],
                                         bus_factory: Callable[[str], str],
                                         daemon_factory: Callable[..., DaemonProcess],
                                         shared_base: Path, domain: str) -> None:
    """SIGTERM while an active commit runs: the daemon aborts the block job before it
    exits 0 (never left running unfollowed); the next start finishes the delete."""
    config, cli, process, vid, alias = attached_volume(
        host_factory, bus_factory, daemon_factory, shared_base, domain, "512M", 1280)
    monitor_write(domain, alias, 0x41, 0)
    s1 = cli.json("snapshot", "create", vid)["Id"]
    monitor_write(domain, alias, 0x42, 2, 400)
    _, conn, dom, target = delete_in_background(cli, domain, vid, s1)
    assert process.stop() == 0
    assert dom.blockJobInfo(target, 0) == {}, "a block job was left running unfollowed"
    daemon_factory(config)  # the start finishes the recorded delete
    guest_flush(domain, alias)
    share = Path(live_disk(domain, vid).source).parent
    check_files(share, vid, [(0x41, 0), (0x42, 2)], {})
    assert dom.blockJobInfo(target, 0) == {}
    conn.close()


def test_domain_destroyed_during_a_live_delete(host_factory: Callable[..., Host],
                                               bus_factory: Callable[[str], str],
                                               daemon_factory: Callable[..., DaemonProcess],
                                               shared_base: Path, domain: str) -> None:
    """The domain dies while its block job runs: the delete is finished offline as soon as
    the job's task lets go, and the volume is available, with no dead end."""
    _, cli, _, vid, alias = attached_volume(host_factory, bus_factory, daemon_factory,
                                            shared_base, domain, "512M", 1280)
    monitor_write(domain, alias, 0x41, 0)
    s1 = cli.json("snapshot", "create", vid)["Id"]
    monitor_write(domain, alias, 0x42, 2, 400)
    share = Path(live_disk(domain, vid).source).parent
    job, conn, dom, _ = delete_in_background(cli, domain, vid, s1)
    dom.destroy()
    conn.close()
    wait_for("the job to end", lambda: cli.json("job", job)["State"] != "running", 60)
    wait_for("the volume to be free", lambda: cli.json("show", vid)["State"] == "available"
             and not cli.json("snapshots", vid), 30)
    shown = cli.json("show", vid)
    assert shown["Attachment"] == ["", ""] and shown["Problems"] == []
    check_files(share, vid, [(0x41, 0), (0x42, 2)], {})
    cli.json("snapshot", "create", vid)  # usable offline, no dead end


def test_crash_before_an_online_extend(host_factory: Callable[..., Host],
                                       bus_factory: Callable[[str], str],
                                       daemon_factory: Callable[..., DaemonProcess],
                                       shared_base: Path, domain: str) -> None:
    """Online extend records its intent before blockResize; the next start finishes it."""
    config, cli, setup, vid, _ = attached_volume(host_factory, bus_factory, daemon_factory,
                                                 shared_base, domain, "16M")
    assert setup.stop() == 0
    crashing = daemon_factory(config, env={"HOSTVOLD_CRASH_AT": "live-extend:intent"})
    cli.run("extend", vid, "40M")
    assert crashing.proc.wait(30) == 86
    daemon_factory(config)
    assert cli.json("show", vid)["Size"] == 40 << 20
    blk = virsh("domblkinfo", domain, live_disk(domain, vid).target, "--human")
    assert "40.000 MiB" in blk, blk


def test_managed_save_refuses_offline_changes(
        live: Callable[..., tuple[Cli, DaemonProcess, Host]],
        persistent: Callable[..., str]) -> None:
    """A domain saved with `virsh managedsave` resumes on the very files it had open: an
    offline change under it is refused with InUse, and allowed once the save is gone."""
    cli, _, _ = live("[libvirt]\nquiesce = never\n")
    domain = persistent()
    vid = cli.json("create", "16M")["Id"]
    cli.json("attach", vid, domain)
    virsh("managedsave", domain)
    wait_for("freed after the save", lambda: cli.json("show", vid)["State"] == "available")
    refused = cli.run("snapshot", "create", vid)
    assert refused.returncode == 1 and "InUse" in refused.stderr and "saved" in refused.stderr
    virsh("managedsave-remove", domain)
    sid = cli.json("snapshot", "create", vid)["Id"]  # the definition follows the new file
    assert f"volume-{vid}.{sid}" in virsh("dumpxml", "--inactive", domain)


def test_libvirt_unreachable_refuses_changes(host_factory: Callable[..., Host],
                                             bus_factory: Callable[[str], str],
                                             daemon_factory: Callable[..., DaemonProcess],
                                             libvirtd: str) -> None:
    """Without libvirt's answer nobody can tell whether a domain uses a volume: the daemon
    starts and serves reads, but refuses changes to existing volumes with a named error."""
    from tests.test_dbus import with_bus

    address = bus_factory("hostvold")
    host = host_factory(64, extra="[libvirt]\nuri = qemu+unix:///system?socket=/nonexistent\n")
    process = daemon_factory(with_bus(host, address))
    cli = Cli(address)
    vid = cli.json("create", "8M")["Id"]  # a new volume: no domain can use it yet
    refused = cli.run("snapshot", "create", vid)
    assert refused.returncode == 1 and "HypervisorUnavailable" in refused.stderr, refused.stderr
    assert cli.json("show", vid)["State"] == "available"
    assert "Traceback" not in process.log_text()


# ---- a cancel that cuts off a pivot --------------------------------------------------------

async def test_a_cancel_cutting_off_a_pivot_is_read_from_the_live_chain(
        host_factory: Callable[..., Host], shared_base: Path, domain: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Job.Cancel lands while libvirt's pivot call runs: the pivot happens. Delivered at
    the next await (``during-the-call``, what a Job.Cancel does) or raised out of the call
    itself (``cut-off-the-call``: the record's step is then read from the live chain), the
    record must say ``pivoted``, never ``job``: after the domain's end a ``job`` record
    would commit the stale overlay over the guest's newer writes in the base. (One test,
    both ways in turn: libvirt takes one event loop registration per process.)"""
    conn = libvirt.open("qemu:///system")
    second = f"hostvold-cancel-{os.getpid()}-{time.monotonic_ns() % 100000}"
    spare = conn.createXML(DOMAIN_XML.format(name=second), 0)  # the first one is destroyed
    try:
        for cancel, name in (("during-the-call", domain), ("cut-off-the-call", second)):
            await _cancel_during_a_pivot(host_factory, shared_base, name, monkeypatch, cancel)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            spare.destroy()
        conn.close()


async def _cancel_during_a_pivot(host_factory: Callable[..., Host], shared_base: Path,
                                 domain: str, monkeypatch: pytest.MonkeyPatch,
                                 cancel: str) -> None:
    from hostvold.server.daemon import Daemon
    from hostvold.virt.guest import BlockDevice

    host = host_factory(256, extra="[libvirt]\nquiesce = never\n",
                        mount_point_base=shared_base / str(time.monotonic_ns()))
    daemon = Daemon(host.config)
    ops = await daemon.start()
    try:
        vid = (await ops.create_volume(size=32 << 20)).id
        await ops.attach(vid, domain)
        alias = str(live_disk(domain, vid).alias)
        monitor_write(domain, alias, 0x41, 0)
        snap = (await ops.create_snapshot(vid)).id
        monitor_write(domain, alias, 0x42, 2)  # into the overlay the delete commits
        original = BlockDevice.pivot

        async def pivot_then_cancelled(self: BlockDevice) -> None:
            task = asyncio.current_task()
            assert task is not None
            if cancel == "during-the-call":
                task.cancel()  # arrives while libvirt's call runs in its thread
            await original(self)
            if cancel == "cut-off-the-call":
                raise asyncio.CancelledError

        monkeypatch.setattr(BlockDevice, "pivot", pivot_then_cancelled)
        with pytest.raises(asyncio.CancelledError):
            await ops.delete_snapshot(vid, snap)
        monkeypatch.undo()
        operation = ops.store.get_volume(vid).operation or {}
        assert operation.get("step") == "pivoted", operation
        share = Path(live_disk(domain, vid).source).parent
        monitor_write(domain, alias, 0x4f, 2)  # the guest writes into the base now
        virsh("destroy", domain)
    finally:
        await daemon.stop()
    daemon = Daemon(host.config)
    ops = await daemon.start()  # recovery finishes the delete offline
    try:
        meta = ops.store.get_volume(vid)
        assert meta.operation is None and meta.snapshots == {}, meta
        check_files(share, vid, [(0x41, 0), (0x4f, 2)], {})
    finally:
        await daemon.stop()
