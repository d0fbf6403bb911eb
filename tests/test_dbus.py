"""The D-Bus API, hostvolctl and the systemd integration, against a real daemon process on a
real private dbus-daemon, with real users for authorization."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from hostvold.core.crash import CRASH_EXIT_STATUS
from tests.conftest import REPO, DaemonProcess, Host, need

pytestmark = pytest.mark.integration
MiB = 1 << 20
ADMIN, READER, GROUP = "hostvold-admin", "hostvold-reader", "hostvold"
INTROSPECTION = Path(__file__).resolve().parent / "introspection"


def with_bus(host: Host, address: str) -> Path:
    host.config_text = host.config_text.replace("[daemon]\n", f"[daemon]\nbus = {address}\n", 1)
    return host.config_file


@pytest.fixture(scope="session")
def users() -> dict[str, str]:
    """Real accounts: one in the admin group, one outside it."""
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
    for user, groups in ((ADMIN, [GROUP]), (READER, [])):
        if subprocess.run(["id", user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh",
                            *(["--groups", ",".join(groups)] if groups else []), user],
                           check=True)
    return {"admin": ADMIN, "reader": READER}


@pytest.fixture(scope="session")
def readable_package() -> Iterator[Path]:
    """A copy of the package other users can read (the checkout may sit in root's home)."""
    root = Path(tempfile.mkdtemp(prefix="hostvold-pkg-"))
    shutil.copytree(REPO / "hostvold", root / "hostvold",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Cli:
    def __init__(self, address: str, package: Path | None = None) -> None:
        self.address = address
        self.package = package

    def run(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, HOSTVOLD_BUS=self.address)
        argv = [sys.executable, "-m", "hostvold.client", *args]
        if user is not None:
            assert self.package is not None
            argv = ["runuser", "-u", user, "--", "env", f"PYTHONPATH={self.package}",
                    f"HOSTVOLD_BUS={self.address}", *argv]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/",
                              timeout=120)

    def json(self, *args: str, user: str | None = None) -> Any:
        result = self.run("--json", *args, user=user)
        assert result.returncode == 0, f"{args}: {result.stderr}"
        return json.loads(result.stdout)

    def job_ended(self, job: str, seconds: float = 60) -> dict[str, Any]:
        """A job's properties once it is no longer running (a ``--no-wait`` call leaves
        the waiting to the caller: here, by asking again)."""
        deadline = time.monotonic() + seconds
        while (shown := self.json("job", job))["State"] == "running":
            assert time.monotonic() < deadline, shown
            time.sleep(0.1)
        return dict(shown)

    def create_snapshot_timed(self, volume_id: str) -> tuple[float, str, str]:
        """Volume.CreateSnapshot over one bus connection, so the time taken is the
        daemon's, not a client's start: (seconds, error name or "", message or id)."""
        return asyncio.run(_create_snapshot_timed(self.address, volume_id))


async def _create_snapshot_timed(address: str, volume_id: str) -> tuple[float, str, str]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        started = time.monotonic()
        reply = await bus.call(Message(
            destination="org.hostvold1", interface="org.hostvold1.Volume",
            path=f"/org/hostvold1/volumes/{volume_id.replace('-', '_')}",
            member="CreateSnapshot", signature="a{sv}", body=[{}]))
        elapsed = time.monotonic() - started
        assert reply is not None
        error = reply.error_name or "" if reply.message_type == MessageType.ERROR else ""
        return elapsed, error, str(reply.body[0]) if reply.body else ""
    finally:
        bus.disconnect()


@pytest.fixture
def running(host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
            daemon_factory: Callable[..., DaemonProcess]) -> Callable[..., tuple[Host, Cli]]:
    def start(policy: str = "hostvold", package: Path | None = None,
              env: dict[str, str] | None = None) -> tuple[Host, Cli]:
        address = bus_factory(policy)
        host = host_factory(1024)
        daemon_factory(with_bus(host, address), env)
        return host, Cli(address, package)
    return start


def test_cli_end_to_end(running: Callable[..., tuple[Host, Cli]], tmp_path: Path) -> None:
    _, cli = running()
    status = cli.json("status")
    assert status["health"] == "ok" and status["volumes"] == 0
    volume = cli.json("create", "64M")
    vid = volume["Id"]
    assert volume["Size"] == 64 * MiB and volume["Format"] == "raw"
    assert volume["State"] == "available"
    first = cli.json("snapshot", "create", vid)
    second = cli.json("snapshot", "create", vid)
    snaps = cli.json("snapshots", vid)
    assert {s["Id"] for s in snaps} == {first["Id"], second["Id"]}
    assert first["Volume"].endswith(vid.replace("-", "_"))
    deleted = cli.json("snapshot", "delete", first["Id"])
    assert deleted["State"] == "completed" and deleted["Operation"] == "delete-snapshot"
    assert [s["Id"] for s in cli.json("snapshots", vid)] == [second["Id"]]
    clone = cli.json("clone", vid)
    assert clone["Id"] != vid and clone["Size"] == 64 * MiB
    exported = cli.json("export", vid, str(tmp_path / "out.qcow2"), "--format", "qcow2")
    assert exported["State"] == "completed" and exported["BytesTotal"] == 64 * MiB
    share = cli.json("shares")[0]
    assert subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(tmp_path / "out.qcow2"),
         f"{share['MountPoint']}/volume-{clone['Id']}"]).returncode == 0
    assert cli.json("delete", vid)["State"] == "completed"
    volumes = cli.json("volumes")
    assert [v["Id"] for v in volumes] == [clone["Id"]]
    assert cli.json("show", clone["Id"])["Snapshots"] == []
    jobs = cli.json("jobs")
    assert {j["Operation"] for j in jobs} >= {"create-volume", "clone", "export",
                                             "delete-volume", "delete-snapshot"}
    missing = cli.run("show", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1 and "NotFound" in missing.stderr
    bad = cli.run("create", "12Q")
    assert bad.returncode == 2
    need(shutil.which("busctl") is not None, "busctl (systemd)")
    tree = subprocess.run(["busctl", f"--address={cli.address}", "introspect",
                           "org.hostvold1", clone["path"]], capture_output=True, text=True)
    assert "org.hostvold1.Volume" in tree.stdout and ".CreateSnapshot" in tree.stdout


def test_cli_explains_daemon_not_running(bus_factory: Callable[[str], str]) -> None:
    cli = Cli(bus_factory("hostvold"))
    result = cli.run("status")
    assert result.returncode == 3 and "not running" in result.stderr
    gone = Cli("unix:path=/nonexistent/socket").run("volumes")
    assert gone.returncode == 3 and "cannot reach" in gone.stderr


async def _client(address: str) -> MessageBus:
    bus: MessageBus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    return bus


async def _call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
                body: list[Any] | None = None) -> list[Any]:
    reply = await bus.call(Message(destination="org.hostvold1", path=path, interface=interface,
                                   member=member, signature=signature, body=body or []))
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply.body
    return list(reply.body)


async def test_list_volumes_rows_match_the_objects(
        running: Callable[..., tuple[Host, Cli]]) -> None:
    """Manager.ListVolumes (what ``hostvolctl volumes`` prints) says what the Volume
    objects say, sorted by id; an option it does not know is refused by name."""
    _, cli = running()
    made = [cli.json("create", size)["Id"] for size in ("1M", "2M", "3M")]
    cli.json("snapshot", "create", made[1])
    bus = await _client(cli.address)
    try:
        (rows,) = await _call(bus, "/org/hostvold1", "org.hostvold1.Manager", "ListVolumes",
                              "a{sv}", [{}])
        reply = await bus.call(Message(
            destination="org.hostvold1", path="/org/hostvold1",
            interface="org.hostvold1.Manager", member="ListVolumes", signature="a{sv}",
            body=[{"share": Variant("s", "x")}]))
    finally:
        bus.disconnect()
    objects = {v["Id"]: v for v in cli.json("volumes")}
    assert [row[1] for row in rows] == sorted(made)
    for path, volume_id, size, fmt, state, snapshots, problems in rows:
        shown = objects[volume_id]
        assert (path, size, fmt, state, snapshots, problems) == (
            shown["path"], shown["Size"], shown["Format"], shown["State"],
            len(shown["Snapshots"]), shown["Problems"])
    assert reply is not None and reply.error_name == "org.hostvold1.Error.InvalidArgument"
    assert "share" in reply.body[0]


async def test_signals_arrive_without_polling(
        running: Callable[..., tuple[Host, Cli]]) -> None:
    _, cli = running()
    bus = await _client(cli.address)
    received: list[tuple[float, Message]] = []
    arrived = asyncio.Event()

    def on_message(message: Message) -> None:
        if message.message_type == MessageType.SIGNAL:
            received.append((time.monotonic(), message))
            arrived.set()

    bus.add_message_handler(on_message)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',sender='org.hostvold1',"
                                 "path_namespace='/org/hostvold1'"]))

    async def signal_matching(test: Callable[[Message], bool]) -> tuple[float, Message]:
        while True:
            for when, message in received:
                if test(message):
                    return when, message
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)

    (job,) = await _call(bus, "/org/hostvold1", "org.hostvold1.Manager", "CreateVolume",
                         "a{sv}", [{"size": Variant("t", 8 * MiB)}])
    _, added = await signal_matching(lambda m: m.member == "InterfacesAdded"
                                     and "org.hostvold1.Volume" in m.body[1])
    volume_path = added.body[0]
    assert added.body[1]["org.hostvold1.Volume"]["Size"].value == 8 * MiB
    (snapshot,) = await _call(bus, volume_path, "org.hostvold1.Volume", "CreateSnapshot",
                              "a{sv}", [{}])
    (job,) = await _call(bus, snapshot, "org.hostvold1.Snapshot", "Delete", "a{sv}", [{}])
    when, completed = await signal_matching(lambda m: m.member == "Completed"
                                            and m.path == job)
    assert completed.body == [True, "", ""]
    (done,) = await _call(bus, job, "org.freedesktop.DBus.Properties", "Get", "ss",
                          ["org.hostvold1.Job", "CompletedTimestampMonotonic"])
    latency = when - done.value / 1_000_000
    print(f"\nJob Completed signal arrived {latency * 1000:.2f} ms after the job ended")
    assert 0 <= latency < 0.05
    removed = [m for _, m in received if m.member == "InterfacesRemoved"]
    assert any(m.body[0] == snapshot for m in removed)
    bus.disconnect()


async def test_objects_answer_alike_through_every_door(
        running: Callable[..., tuple[Host, Cli]]) -> None:
    """GetManagedObjects (built in one pass by hostvold, each volume's entry kept marshalled
    until the volume changes) gives what Properties.GetAll gives for every object; a method
    reaches the object whose path it was sent to, though one handler serves every object of
    an interface; a call that wants no reply still runs."""
    _, cli = running()
    ids = [cli.json("create", "8M")["Id"] for _ in range(3)]
    bus = await _client(cli.address)
    paths = [f"/org/hostvold1/volumes/{vid.replace('-', '_')}" for vid in ids]
    (before,) = await _call(bus, "/org/hostvold1", "org.freedesktop.DBus.ObjectManager",
                            "GetManagedObjects")  # every volume's entry is kept from here on
    assert [len(before[p]["org.hostvold1.Volume"]["Snapshots"].value) for p in paths] == \
        [0, 0, 0]
    snapshot = (await _call(bus, paths[1], "org.hostvold1.Volume", "CreateSnapshot", "a{sv}",
                            [{}]))[0]
    await bus.send(Message(destination="org.hostvold1", path=paths[2],
                           interface="org.hostvold1.Volume", member="CreateSnapshot",
                           signature="a{sv}", body=[{}], flags=MessageFlag.NO_REPLY_EXPECTED))
    deadline = time.monotonic() + 10
    while not cli.json("snapshots", ids[2]):
        assert time.monotonic() < deadline, "the call sent without a reply did not run"
        await asyncio.sleep(0.05)
    (managed,) = await _call(bus, "/org/hostvold1", "org.freedesktop.DBus.ObjectManager",
                             "GetManagedObjects")
    assert set(paths) | {snapshot} <= set(managed)
    for path, interfaces in managed.items():
        for interface, values in interfaces.items():
            (direct,) = await _call(bus, path, "org.freedesktop.DBus.Properties", "GetAll",
                                    "s", [interface])
            assert {k: v.value for k, v in values.items()} == \
                {k: v.value for k, v in direct.items()}, (path, interface)
    assert [len(managed[p]["org.hostvold1.Volume"]["Snapshots"].value) for p in paths] == \
        [0, 1, 1]
    assert managed[snapshot]["org.hostvold1.Snapshot"]["Volume"].value == paths[1]
    bus.disconnect()


MUTATIONS = [
    ["create", "1M"], ["delete", "{vid}"], ["extend", "{vid}", "2M"],
    ["export", "{vid}", "/tmp/hostvold-denied.raw"], ["clone", "{vid}"],
    ["snapshot", "create", "{vid}"], ["snapshot", "delete", "{sid}"],
    ["snapshot", "create-volume", "{sid}"], ["revert", "{vid}", "{sid}"], ["repair", "{vid}"],
    ["import", "/etc/hostname"], ["job", "{job}", "--cancel"],
]


@pytest.mark.parametrize("policy", ["hostvold", "permissive"])
def test_authorization(running: Callable[..., tuple[Host, Cli]], users: dict[str, str],
                       readable_package: Path, policy: str) -> None:
    """Outside the admin group: reading works, every change is refused with exit code 4.
    "hostvold": the bus policy file refuses first; "permissive": the daemon's own check."""
    _, cli = running(policy, readable_package)
    volume = cli.json("create", "4M")
    snap = cli.json("snapshot", "create", volume["Id"])
    ids = {"vid": volume["Id"], "sid": snap["Id"], "job": volume["job"]}
    reader = users["reader"]
    assert cli.json("status", user=reader)["volumes"] == 1
    assert [v["Id"] for v in cli.json("volumes", user=reader)] == [volume["Id"]]
    assert cli.json("show", volume["Id"], user=reader)["Size"] == 4 * MiB
    assert len(cli.json("snapshots", user=reader)) == 1
    listing = cli.run("volumes", user=reader)  # the table: Manager.ListVolumes
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[1].split() == [
        volume["Id"], "4.0", "MiB", volume["Format"], "available", "1"]
    for command in MUTATIONS:
        args = [part.format(**ids) for part in command]
        result = cli.run(*args, user=reader)
        assert result.returncode == 4, f"{args}: {result.returncode} {result.stderr}"
        assert "permission denied" in result.stderr
    assert not Path("/tmp/hostvold-denied.raw").exists()
    assert [v["Id"] for v in cli.json("volumes")] == [volume["Id"]]
    made = cli.json("create", "1M", user=users["admin"])
    assert made["State"] == "available"
    assert cli.json("snapshot", "create", made["Id"], user=users["admin"])["Id"]


def _interfaces(xml_text: str) -> dict[str, str]:
    """The org.hostvold1 interfaces of an introspection document, canonically written."""
    root = ET.fromstring(xml_text)
    found = {}
    for interface in root.findall("interface"):
        name = interface.get("name", "")
        if name.startswith("org.hostvold1."):
            ET.indent(interface)
            found[name] = ET.tostring(interface, encoding="unicode") + "\n"
    return found


async def test_introspection_matches_committed_xml(
        running: Callable[..., tuple[Host, Cli]]) -> None:
    _, cli = running()
    volume = cli.json("create", "1M")
    snap = cli.json("snapshot", "create", volume["Id"])
    share = cli.json("shares")[0]
    bus = await _client(cli.address)
    exported: dict[str, str] = {}
    for path in ("/org/hostvold1", share["path"], volume["path"], snap["path"],
                 f"/org/hostvold1/jobs/{volume['job'].rsplit('/', 1)[1]}"):
        (xml_text,) = await _call(bus, path, "org.freedesktop.DBus.Introspectable",
                                  "Introspect")
        exported |= _interfaces(xml_text)
    bus.disconnect()
    assert set(exported) == {f"org.hostvold1.{n}" for n in
                             ("Manager", "Share", "Volume", "Snapshot", "Job")}
    if os.environ.get("HOSTVOLD_WRITE_INTROSPECTION") == "1":
        INTROSPECTION.mkdir(exist_ok=True)
        for name, text in exported.items():
            (INTROSPECTION / f"{name}.xml").write_text(text)
        pytest.fail("introspection XML written to tests/introspection: review and commit it")
    for name, text in exported.items():
        committed = (INTROSPECTION / f"{name}.xml").read_text()
        assert text == committed, f"{name} differs from tests/introspection/{name}.xml"


def test_unit_file_verifies_and_is_hardened() -> None:
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze (systemd)")
    unit = REPO / "systemd" / "hostvold.service"
    verify = subprocess.run(["systemd-analyze", "verify", "--recursive-errors=no", "--man=no",
                             str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stdout.strip() and not verify.stderr.strip(), \
        verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True)
    match = re.search(r"Overall exposure level for hostvold.service: ([\d.]+)",
                      security.stdout + security.stderr)
    assert match, security.stdout
    print(f"\nsystemd-analyze security: hostvold.service exposure {match.group(1)}")
    assert float(match.group(1)) <= 5.0
    text = "\n".join(line for line in unit.read_text().splitlines()
                     if not line.startswith("#"))
    # none of these may appear: each gives the service its own mount namespace, which
    # would hide the shares it mounts from libvirt and QEMU
    for option in ("ProtectSystem=", "PrivateTmp=", "ReadWritePaths=", "ReadOnlyPaths=",
                   "ProtectHome=", "PrivateDevices=", "PrivateMounts=", "ProtectKernelTunables=",
                   "ProtectKernelModules=", "ProtectKernelLogs=", "ProtectControlGroups=",
                   "InaccessiblePaths=", "TemporaryFileSystem=", "BindPaths=", "ProtectProc=",
                   "ProcSubset=", "MountFlags="):
        assert option not in text, option
    assert "Type=notify" in text and "WatchdogSec=" in text and "Restart=on-failure" in text


def test_ready_after_recovery_and_watchdog(host_factory: Callable[..., Host],
                                           bus_factory: Callable[[str], str],
                                           daemon_factory: Callable[..., DaemonProcess]) -> None:
    host = host_factory(256)
    address = bus_factory("hostvold")
    config = with_bus(host, address)
    first = daemon_factory(config)
    cli = Cli(address)
    volume = cli.json("create", "4M")
    assert first.stop() == 0
    # an interrupted snapshot create: the overlay exists, the info file does not know it
    snapshot = "5a5a5a5a-0000-4000-8000-0000000000aa"
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.crash_driver", str(config), "create-snapshot",
         json.dumps({"volume": volume["Id"], "snapshot": snapshot})],
        cwd=REPO, env=dict(os.environ, HOSTVOLD_CRASH_AT="create-snapshot:overlay"),
        capture_output=True, text=True)
    assert crashed.returncode == CRASH_EXIT_STATUS, crashed.stderr
    mount = next(p for p in (host.state_dir / "mnt").iterdir())
    overlay = mount / f"volume-{volume['Id']}.{snapshot}"
    assert overlay.exists()
    second = daemon_factory(config, env={"WATCHDOG_USEC": "300000"}, wait=False)
    while True:
        message = second.receive(30)
        if "READY=1" in message:
            assert not overlay.exists()  # recovery had finished before READY
            break
    statuses = [m for _, m in second.messages if "STATUS=" in m]
    assert any("recovering" in m for m in statuses)
    pings: list[float] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if "WATCHDOG=1" in second.receive(1):
            pings.append(second.messages[-1][0])
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(f"\nwatchdog pings: {len(pings)} in 1.5 s, largest gap {max(gaps) * 1000:.0f} ms")
    assert len(pings) >= 8 and max(gaps) <= 0.15  # at least every half of 300 ms


def test_sigterm_during_a_long_job_is_recovered(host_factory: Callable[..., Host],
                                                bus_factory: Callable[[str], str],
                                                daemon_factory: Callable[..., DaemonProcess],
                                                ) -> None:
    host = host_factory(2048)
    address = bus_factory("hostvold")
    config = with_bus(host, address)
    daemon = daemon_factory(config)
    cli = Cli(address)
    volume = cli.json("create", "1G")
    snap = cli.json("snapshot", "create", volume["Id"])
    mount = Path(cli.json("shares")[0]["MountPoint"])
    overlay = mount / f"volume-{volume['Id']}.{snap['Id']}"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 0 900M", str(overlay)],
                   check=True, capture_output=True)
    job = cli.json("--no-wait", "snapshot", "delete", snap["Id"])["job"]

    async def wait_for_progress() -> None:
        bus = await _client(address)
        seen = asyncio.Event()

        def on_message(message: Message) -> None:
            if message.member == "PropertiesChanged" and message.path == job:
                seen.set()

        bus.add_message_handler(on_message)
        await bus.call(Message(destination="org.freedesktop.DBus",
                               path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                               member="AddMatch", signature="s",
                               body=[f"type='signal',path='{job}'"]))
        (state,) = await _call(bus, job, "org.freedesktop.DBus.Properties", "Get", "ss",
                               ["org.hostvold1.Job", "State"])
        assert state.value == "running", "the job ended before the test could stop it"
        await asyncio.wait_for(seen.wait(), 30)
        bus.disconnect()

    asyncio.run(wait_for_progress())
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    print(f"\nSIGTERM during a commit: exit 0 after {time.monotonic() - started:.2f} s")
    meta = json.loads((mount / f"volume-{volume['Id']}.meta").read_text())
    assert meta["operation"]["name"] == "delete-snapshot"  # left recoverable, not forgotten
    daemon_factory(config)  # the next start resumes the commit
    shown = cli.json("show", volume["Id"])
    assert shown["Snapshots"] == [] and shown["State"] == "available"
    assert not overlay.exists()
    subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5c 0 900M",
                    str(mount / f"volume-{volume['Id']}")], check=True, capture_output=True)
