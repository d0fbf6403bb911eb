"""Volumes attached to a real TCG domain on a real libvirtd, driven through D-Bus and
hostvolctl; guest writes go through the running QEMU's own block layer."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from hostvold.core.config import parse_config
from hostvold.core.errors import Failed, HypervisorError
from hostvold.virt.guest import parse_disks
from tests.conftest import DaemonProcess, Host
from tests.live_fixtures import DOMAIN_XML
from tests.test_dbus import Cli, with_bus

pytestmark = pytest.mark.integration
MiB = 1 << 20

def monitor_write(domain: str, alias: str, pattern: int, offset_mib: int,
                  length_mib: int = 1) -> None:
    """A write by the running QEMU itself into the disk's active layer, then a flush (as a
    guest's fsync would), so readers outside QEMU see the qcow2 metadata too."""
    for command in (f"write -P {pattern} {offset_mib}M {length_mib}M", "flush"):
        result = subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command",
                                 domain, "--hmp", f'qemu-io -d {alias} "{command}"'],
                                capture_output=True, text=True, check=True)
        assert "error" not in result.stdout.lower(), result.stdout


def guest_flush(domain: str, alias: str) -> None:
    subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", domain, "--hmp",
                    f'qemu-io -d {alias} "flush"'], capture_output=True, text=True, check=True)


def live_disk(domain: str, serial: str) -> Any:
    xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", domain],
                         capture_output=True, text=True, check=True).stdout
    return next(d for d in parse_disks(xml) if d.serial == serial)


def reads(path: str, fmt: str, checks: list[tuple[int, int]]) -> bool:
    """(pattern, offset MiB) pairs read back from outside, sharing QEMU's images (-U)."""
    argv = ["qemu-io", "-U", "-r", "-f", fmt]
    for pattern, offset in checks:
        argv += ["-c", f"read -P {pattern} {offset}M 1M"]
    result = subprocess.run([*argv, path], capture_output=True, text=True)
    ok = result.returncode == 0 and "fail" not in result.stdout.lower()
    if not ok:
        print(f"qemu-io on {path}: {result.stdout} {result.stderr}")
    return ok


def expected(generation: int) -> list[tuple[int, int]]:
    """After generation g: region 0 holds g's pattern, region k holds k's for k <= g."""
    checks = [(0x40 + generation, 0)]
    checks += [(0x40 + k if k <= generation else 0, 2 * k) for k in range(1, 9)]
    return checks


def verify_volume(domain: str, alias: str, vid: str, snapshots: dict[str, int],
                  final: list[tuple[int, int]]) -> None:
    """The info file equals the live chain, no orphan file, every snapshot reads its own
    point in time and the disk the newest data."""
    # as a guest's next fsync would: QEMU writes its cached qcow2 metadata, so readers
    # outside it see what a block job copied
    guest_flush(domain, alias)
    disk = live_disk(domain, vid)
    share = Path(disk.source).parent
    info = json.loads((share / f"volume-{vid}.info").read_text())
    assert info["active"] == Path(disk.source).name
    assert sorted(info) == sorted(["active", *snapshots])
    chain = [Path(p).name for p in disk.chain]
    assert sorted(chain[:-1]) == sorted(info[s] for s in snapshots)
    on_disk = sorted(p.name for p in share.iterdir() if p.name.startswith(f"volume-{vid}")
                     and not p.name.endswith((".info", ".meta")))
    assert on_disk == sorted(chain)  # no orphan file
    assert reads(disk.source, "qcow2" if len(chain) > 1 else "raw", final)
    for sid, generation in snapshots.items():
        data = chain[chain.index(info[sid]) + 1]
        fmt = "raw" if data == chain[-1] else "qcow2"
        assert reads(str(share / data), fmt, expected(generation)), (sid, generation)


def test_attach_detach_and_domain_destroy(live: Callable[..., tuple[Cli, DaemonProcess, Host]],
                                          domain: str) -> None:
    cli, _, _ = live()
    volume = cli.json("create", "32M")
    attached = cli.json("attach", volume["Id"], domain)
    assert attached["State"] == "in-use"
    assert attached["Attachment"][0] == domain and attached["Attachment"][1].startswith("sd")
    assert live_disk(domain, volume["Id"]).serial == volume["Id"]
    denied = cli.run("delete", volume["Id"])
    assert denied.returncode == 1 and "InUse" in denied.stderr and domain in denied.stderr
    detached = cli.json("detach", volume["Id"])
    assert detached["State"] == "available" and detached["Attachment"] == ["", ""]
    cli.json("attach", volume["Id"], domain, "--target", "sdc")
    assert cli.json("show", volume["Id"])["Attachment"] == [domain, "sdc"]
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", domain], check=True,
                   capture_output=True)
    deadline = time.monotonic() + 10  # the lifecycle event frees the volume
    while cli.json("show", volume["Id"])["State"] != "available":
        assert time.monotonic() < deadline, "the volume stayed in-use after the domain died"
        time.sleep(0.1)


@pytest.mark.parametrize("order", ["newest-first", "oldest-first", "middle-out"])
def test_live_snapshots_keep_every_write(live: Callable[..., tuple[Cli, DaemonProcess, Host]],
                                        domain: str, order: str) -> None:
    cli, process, _ = live()
    volume = cli.json("create", "32M")
    vid = volume["Id"]
    cli.json("attach", vid, domain)
    alias = live_disk(domain, vid).alias
    snapshots: dict[str, int] = {}  # snapshot id -> generation
    for generation in range(1, 7):
        monitor_write(domain, alias, 0x40 + generation, 0)
        monitor_write(domain, alias, 0x40 + generation, 2 * generation)
        snapshots[cli.json("snapshot", "create", vid)["Id"]] = generation
        assert live_disk(domain, vid).source.endswith(list(snapshots)[-1])
    monitor_write(domain, alias, 0x47, 0)
    monitor_write(domain, alias, 0x47, 14)
    monitor_write(domain, alias, 0x47, 20, 8)  # a big last write: pulling beats committing
    final = expected(7)

    def verify() -> None:
        verify_volume(domain, alias, vid, snapshots, final)

    verify()
    ids = list(snapshots)
    sequence = {"newest-first": ids[::-1], "oldest-first": ids,
                "middle-out": [ids[2], ids[3], ids[1], ids[4], ids[0], ids[5]]}[order]
    for sid in sequence:
        done = cli.json("snapshot", "delete", sid)
        assert done["State"] == "completed"
        del snapshots[sid]
        verify()
    assert cli.json("show", vid)["State"] == "in-use"
    strategies = {s for s in ("by commit", "by active-commit", "by pull")
                  if s in process.log_text()}
    print(f"\n{order}: strategies used {sorted(strategies)}")
    if order == "newest-first":
        assert {"by pull", "by active-commit"} <= strategies
    if order == "oldest-first":
        assert "by commit" in strategies


def test_quiesce_policies(live: Callable[..., tuple[Cli, DaemonProcess, Host]],
                          domain: str) -> None:
    cli, _, _ = live("[libvirt]\nquiesce = require\n")
    volume = cli.json("create", "8M")
    cli.json("attach", volume["Id"], domain)
    before = live_disk(domain, volume["Id"]).source
    refused = cli.run("snapshot", "create", volume["Id"])
    assert refused.returncode == 1 and "QuiesceFailed" in refused.stderr
    assert live_disk(domain, volume["Id"]).source == before
    assert cli.json("snapshots", volume["Id"]) == []
    assert sorted(p.name for p in Path(before).parent.iterdir()
                  if p.name.startswith(f"volume-{volume['Id']}")) == [
        f"volume-{volume['Id']}", f"volume-{volume['Id']}.meta"]
    cli.json("detach", volume["Id"])

    cli2, _, _ = live("[libvirt]\nquiesce = try\n")
    other = cli2.json("create", "8M")
    cli2.json("attach", other["Id"], domain)
    snap = cli2.json("snapshot", "create", other["Id"])
    assert snap["Quiesced"] is False


class _FakeGuest:
    """A domain whose every pivot is refused with VIR_ERR_BLOCK_COPY_ACTIVE."""

    name = "fake"

    def __init__(self) -> None:
        self.pivots = 0
        self.aborted = False

    def block(self, target: str) -> _FakeGuest:
        return self

    async def pivot(self) -> None:
        self.pivots += 1
        raise HypervisorError("block copy still active: disk not ready for pivot yet",
                              libvirt.VIR_ERR_BLOCK_COPY_ACTIVE)

    async def abort_job(self) -> None:
        self.aborted = True


class _Records:
    """Stands in for the volume store: keeps each record the pivot writes."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    async def record(self, files: Any, meta: Any) -> Any:
        self.steps.append(meta.operation["step"])
        return meta


async def test_pivot_refused_is_retried_then_aborted() -> None:
    """A unit test with a fake domain: VIR_ERR_BLOCK_COPY_ACTIVE on every pivot."""
    from hostvold.core.records import VolumeMeta
    from hostvold.ops.live_delete import LiveDelete

    config = parse_config("[libvirt]\npivot_retries = 3\n")
    deleter = LiveDelete.__new__(LiveDelete)
    deleter.pivot_retries = config.libvirt.pivot_retries
    records = _Records()
    deleter.store = records  # type: ignore[assignment]
    meta = VolumeMeta(id="x", size=1, format="raw", created="", state="in-use", share="s",
                      active="a", operation={"name": "live-delete-snapshot", "target": "sda",
                                             "step": "job"})
    guest = _FakeGuest()
    with pytest.raises(Failed, match="refused 4 times"):
        await deleter._pivot(guest, None, meta)  # type: ignore[arg-type]
    assert guest.pivots == 4 and guest.aborted
    assert records.steps == ["pivot", "job"]  # recorded before; back to "job" after abort


def test_live_snapshot_latency(live: Callable[..., tuple[Cli, DaemonProcess, Host]],
                               domain: str, shared_base: Path) -> None:
    """One online snapshot create through D-Bus against the same libvirt call made bare."""
    cli, _, _ = live("[libvirt]\nquiesce = never\n")
    volume = cli.json("create", "8M")
    cli.json("attach", volume["Id"], domain)
    result = subprocess.run(
        [sys.executable, "-m", "bench.live_latency", "--bus", cli.address, "--volume",
         volume["Id"], "--domain", domain, "--scratch", str(shared_base), "--rounds", "3"],
        capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent),
        timeout=300)
    assert result.returncode == 0, result.stderr
    print("\n" + result.stdout)
    lines = result.stdout.splitlines()
    figures = json.loads(next(line for line in lines if line.startswith("{")))
    assert figures["ratio"] > 0 and figures["event_to_completed_ms"] >= 0
    assert any(line.startswith("P1: ") for line in lines[-2:])  # bench/run_all's rows
    assert lines[-1].startswith("P2: ")


def attached_volume(host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
                    daemon_factory: Callable[..., DaemonProcess], shared_base: Path,
                    domain: str, size: str,
                    share_mib: int = 256) -> tuple[Path, Cli, DaemonProcess, str, str]:
    """A daemon (quiesce=never) with one volume attached to ``domain``: (config, client,
    daemon, volume id, disk alias)."""
    address = bus_factory("hostvold")
    host = host_factory(share_mib, extra="[libvirt]\nquiesce = never\n",
                        mount_point_base=shared_base / str(time.monotonic_ns()))
    config = with_bus(host, address)
    setup = daemon_factory(config)
    cli = Cli(address)
    vid = cli.json("create", size)["Id"]
    cli.json("attach", vid, domain)
    return config, cli, setup, vid, str(live_disk(domain, vid).alias)


LIVE_CRASHES = [
    *[("create", "-", f"live-create-snapshot:{step}")
      for step in ("intent", "overlay", "switched", "info")],
    *[("delete", strategy, f"live-delete-snapshot:{step}")
      for strategy in ("commit", "active-commit", "pull")
      for step in ("intent", "job-started", "job-done", "gone-from-chain", "info")],
]


@pytest.mark.parametrize(("operation", "strategy", "point"), LIVE_CRASHES,
                         ids=[f"{p}[{s}]" for _, s, p in LIVE_CRASHES])
def test_live_crash_then_restart(host_factory: Callable[..., Host],
                                 bus_factory: Callable[[str], str],
                                 daemon_factory: Callable[..., DaemonProcess],
                                 shared_base: Path, domain: str, operation: str, strategy: str,
                                 point: str) -> None:
    """The daemon dies at a persisted step of a live operation; the next start must leave
    the chain consistent, every write intact and no block job behind."""
    config, cli, setup, vid, alias = attached_volume(host_factory, bus_factory, daemon_factory,
                                                     shared_base, domain, "32M")
    snapshots: dict[str, int] = {}
    for generation in (1, 2, 3):
        monitor_write(domain, alias, 0x40 + generation, 0)
        monitor_write(domain, alias, 0x40 + generation, 2 * generation)
        snapshots[cli.json("snapshot", "create", vid)["Id"]] = generation
    monitor_write(domain, alias, 0x44, 0)
    monitor_write(domain, alias, 0x44, 8)
    if strategy == "pull":
        monitor_write(domain, alias, 0x44, 20, 8)
    ids = list(snapshots)
    assert setup.stop() == 0
    first = daemon_factory(config, env={"HOSTVOLD_CRASH_AT": point})
    assert cli.json("show", vid)["State"] == "in-use"  # found attached again at start
    if operation == "create":
        cli.run("snapshot", "create", vid, "--id", "5a5a5a5a-0000-4000-8000-0000000000c1")
    else:
        cli.run("snapshot", "delete", ids[0] if strategy == "commit" else ids[-1])
    assert first.proc.wait(30) == 86, f"{point} not reached: {first.log_text()[-2000:]}"
    daemon_factory(config)  # recovery runs before READY
    if operation == "create":
        listed = {s["Id"] for s in cli.json("snapshots", vid)}
        if "5a5a5a5a-0000-4000-8000-0000000000c1" in listed:
            snapshots["5a5a5a5a-0000-4000-8000-0000000000c1"] = 4
    else:
        del snapshots[ids[0] if strategy == "commit" else ids[-1]]  # rolled forward
    conn = libvirt.open("qemu:///system")
    target = live_disk(domain, vid).target
    assert conn.lookupByName(domain).blockJobInfo(target, 0) == {}  # no job left behind
    conn.close()
    verify_volume(domain, alias, vid, snapshots, expected(4))
    assert cli.json("show", vid)["State"] == "in-use"
    extra = cli.json("snapshot", "create", vid)["Id"]  # usable for the next operation
    snapshots[extra] = 4
    verify_volume(domain, alias, vid, snapshots, expected(4))


def test_libvirtd_restart_during_active_commit(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess], shared_base: Path,
        domain: str) -> None:
    """libvirtd is killed and started again while an active commit runs: hostvold
    reconnects, looks at the job again, pivots, and the Job reports success."""
    address = bus_factory("hostvold")
    host = host_factory(1024, extra="[libvirt]\nquiesce = never\n",
                        mount_point_base=shared_base / str(time.monotonic_ns()))
    process = daemon_factory(with_bus(host, address))
    cli = Cli(address)
    vid = cli.json("create", "512M")["Id"]
    cli.json("attach", vid, domain)
    alias = live_disk(domain, vid).alias
    monitor_write(domain, alias, 0x41, 0)
    monitor_write(domain, alias, 0x41, 2)
    snap = cli.json("snapshot", "create", vid)["Id"]
    monitor_write(domain, alias, 0x42, 0)
    monitor_write(domain, alias, 0x42, 4)
    monitor_write(domain, alias, 0x5e, 64, 384)  # enough for the commit to take a while
    job = cli.json("--no-wait", "snapshot", "delete", snap)["job"]
    target = live_disk(domain, vid).target
    conn = libvirt.open("qemu:///system")
    started = time.monotonic() + 30  # under load the job may start a moment later
    while not conn.lookupByName(domain).blockJobInfo(target, 0) and \
            len(live_disk(domain, vid).chain) > 1:
        assert time.monotonic() < started, cli.json("job", job)
        time.sleep(0.05)
    conn.close()
    subprocess.run(["pkill", "-9", "-x", "libvirtd"], check=True)
    time.sleep(0.5)  # the test's own pause before bringing libvirtd back
    subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 60
    while (state := cli.json("job", job)["State"]) == "running":
        assert time.monotonic() < deadline, process.log_text()[-3000:]
        time.sleep(0.2)
    assert state == "completed", (cli.json("job", job), process.log_text()[-3000:])
    assert "reconnect" in process.log_text().lower() or "connection closed" in \
        process.log_text().lower()
    conn = libvirt.open("qemu:///system")
    assert conn.lookupByName(domain).blockJobInfo(live_disk(domain, vid).target, 0) == {}
    conn.close()
    checks = [(0x42, 0), (0x41, 2), (0x42, 4)]
    guest_flush(domain, alias)
    disk = live_disk(domain, vid)
    assert len(disk.chain) == 1 and reads(disk.source, "raw", checks)
    assert reads(disk.source, "raw", [(0x5e, 64 + 100)])
    assert cli.json("snapshots", vid) == []


def test_clone_and_export_of_an_attached_volume(
        live: Callable[..., tuple[Cli, DaemonProcess, Host]], domain: str,
        tmp_path: Path) -> None:
    """Copied out from a temporary point in time while the guest runs; nothing is left."""
    cli, _, _ = live("[libvirt]\nquiesce = never\n")
    vid = cli.json("create", "16M")["Id"]
    cli.json("attach", vid, domain)
    alias = live_disk(domain, vid).alias
    monitor_write(domain, alias, 0x61, 0)
    kept = cli.json("snapshot", "create", vid)["Id"]
    monitor_write(domain, alias, 0x62, 2)
    chain_before = live_disk(domain, vid).chain
    clone = cli.json("clone", vid)
    dest = tmp_path / "attached.qcow2"
    assert cli.json("export", vid, str(dest), "--format", "qcow2")["State"] == "completed"
    for path, fmt in ((str(Path(live_disk(domain, vid).source).parent /
                           f"volume-{clone['Id']}"), "raw"), (str(dest), "qcow2")):
        assert reads(path, fmt, [(0x61, 0), (0x62, 2)]), path
    assert [s["Id"] for s in cli.json("snapshots", vid)] == [kept]
    assert live_disk(domain, vid).chain == chain_before  # the temporary snapshot is gone
    assert cli.json("show", vid)["State"] == "in-use"


@pytest.fixture
def persistent_domain(libvirtd: str, shared_base: Path) -> Iterator[str]:
    conn = libvirt.open(libvirtd)
    name = f"hostvold-persistent-{os.getpid()}-{time.monotonic_ns() % 100000}"
    dom = conn.defineXML(DOMAIN_XML.format(name=name))
    dom.create()
    yield name
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()
    conn.close()


def test_persistent_domain_definition_follows_the_chain(
        live: Callable[..., tuple[Cli, DaemonProcess, Host]], persistent_domain: str) -> None:
    """The inactive definition names the same files as the live one after every change,
    so the next boot uses the file hostvold knows."""
    cli, _, _ = live("[libvirt]\nquiesce = never\n")
    vid = cli.json("create", "16M")["Id"]
    cli.json("attach", vid, persistent_domain)
    alias = live_disk(persistent_domain, vid).alias
    conn = libvirt.open("qemu:///system")
    dom = conn.lookupByName(persistent_domain)

    def sources(flags: int) -> list[str]:
        return next(d.chain for d in parse_disks(dom.XMLDesc(flags)) if d.serial == vid)

    def same() -> None:
        live_chain = sources(0)
        inactive = sources(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert inactive[0] == live_chain[0], (inactive, live_chain)
        assert set(inactive) <= set(live_chain), (inactive, live_chain)

    same()
    ids = []
    for generation in (1, 2, 3):
        monitor_write(persistent_domain, alias, 0x70 + generation, 0)
        ids.append(cli.json("snapshot", "create", vid)["Id"])
        same()
    monitor_write(persistent_domain, alias, 0x7a, 6, 8)  # makes the newest delete a pull
    for sid in (ids[2], ids[0], ids[1]):
        cli.json("snapshot", "delete", sid)
        same()
    conn.close()


@pytest.mark.parametrize("point", ["live-delete-snapshot:job-started",
                                   "live-create-snapshot:switched"])
def test_domain_gone_mid_operation_is_finished_offline(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess], shared_base: Path, domain: str,
        point: str) -> None:
    """hostvold dies mid-operation and the domain is destroyed before it comes back: the
    next start finishes the operation with qemu-img, and the volume is available."""
    config, cli, setup, vid, alias = attached_volume(host_factory, bus_factory, daemon_factory,
                                                     shared_base, domain, "16M")
    snapshots = {}
    for generation in (1, 2):
        monitor_write(domain, alias, 0x40 + generation, 0)
        monitor_write(domain, alias, 0x40 + generation, 2 * generation)
        snapshots[cli.json("snapshot", "create", vid)["Id"]] = generation
    monitor_write(domain, alias, 0x43, 0)
    monitor_write(domain, alias, 0x43, 6)
    share = Path(live_disk(domain, vid).source).parent
    assert setup.stop() == 0
    crashing = daemon_factory(config, env={"HOSTVOLD_CRASH_AT": point})
    ids = list(snapshots)
    if "delete" in point:
        cli.run("snapshot", "delete", ids[0])  # below the active file: a commit
    else:
        cli.run("snapshot", "create", vid)
    assert crashing.proc.wait(30) == 86
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", domain], check=True,
                   capture_output=True)
    daemon_factory(config)
    shown = cli.json("show", vid)
    assert shown["State"] == "available" and shown["Attachment"] == ["", ""]
    info = json.loads((share / f"volume-{vid}.info").read_text())
    if "delete" in point:
        del snapshots[ids[0]]
    assert set(info) - {"active"} >= set(snapshots)
    active = share / info["active"]
    fmt = "raw" if info["active"] == f"volume-{vid}" else "qcow2"
    assert reads(str(active), fmt, [(0x43, 0), (0x41, 2), (0x42, 4), (0x43, 6)])
    files = sorted(p.name for p in share.iterdir() if p.name.startswith(f"volume-{vid}")
                   and not p.name.endswith((".info", ".meta")))
    chain = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", fmt, "--output=json", "--backing-chain", str(active)],
        capture_output=True, text=True, check=True).stdout)
    assert files == sorted(Path(layer["filename"]).name for layer in chain)  # no orphan
    cli.json("snapshot", "create", vid)  # usable offline now


def test_online_extend(live: Callable[..., tuple[Cli, DaemonProcess, Host]],
                       domain: str) -> None:
    """An attached volume grows through blockResize; the guest sees the new size."""
    cli, _, _ = live("[libvirt]\nquiesce = never\n")
    vid = cli.json("create", "16M")["Id"]
    cli.json("attach", vid, domain)
    alias = live_disk(domain, vid).alias
    monitor_write(domain, alias, 0x33, 0)
    cli.json("snapshot", "create", vid)
    assert cli.json("extend", vid, "48M")["State"] == "completed"
    assert cli.json("show", vid)["Size"] == 48 * MiB
    blk = subprocess.run(["virsh", "-c", "qemu:///system", "domblkinfo", domain,
                          live_disk(domain, vid).target, "--human"],
                         capture_output=True, text=True, check=True).stdout
    assert "48.000 MiB" in blk, blk
    monitor_write(domain, alias, 0x34, 40)  # beyond the old end
    guest_flush(domain, alias)
    assert reads(live_disk(domain, vid).source, "qcow2", [(0x33, 0), (0x34, 40)])
