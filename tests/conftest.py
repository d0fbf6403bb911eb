"""Real-service test harness.

Session fixtures bring up the real things the suite needs and clean them up:
loop-mounted ext4 shares, ``virtlogd`` + ``libvirtd`` on ``qemu:///system``, and a private
``dbus-daemon`` with a system-bus-style policy. With ``CI=true`` or
``HOSTVOLD_REQUIRE_INTEGRATION=1`` a missing service fails the test; it never skips.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from bench.live_rig import URI, CannotRun, ensure_libvirtd, libvirt_answers
from hostvold.core.config import Config, parse_config
from hostvold.ops.operations import Operations
from hostvold.server.daemon import Daemon

pytest_plugins = ["tests.live_fixtures", "tests.guest_fixtures",  # domains, the real guest
                  "tests.cluster_fixtures",  # etcd, hosts
                  "tests.migration_fixtures",  # a second libvirt host
                  "tests.sshfs_fixtures"]  # a network share whose link can be cut

REQUIRE_INTEGRATION = (os.environ.get("CI") == "true"
                       or os.environ.get("HOSTVOLD_REQUIRE_INTEGRATION") == "1")


def need(available: bool, what: str) -> None:
    """Fail (in CI) or skip (on a developer machine) when a real service is missing."""
    if available:
        return
    if REQUIRE_INTEGRATION:
        pytest.fail(f"required service missing: {what}", pytrace=False)
    pytest.skip(f"service missing: {what}")


def run(*argv: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True,  # type: ignore
                          **kwargs)


# ---- loop-mounted ext4 shares ----------------------------------------------------------

MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0"],
        # extents shared between files (reflink): copy_file_range clones instead of copying
        "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]}


def make_ext4_image(path: Path, size_mib: int, fs: str = "ext4") -> Path:
    """A sparse file formatted as ext4 (or ``fs``): mounted with ``-o loop`` it is a real
    filesystem with real capacity and real ENOSPC. XFS needs at least 300 MiB."""
    need(shutil.which(MKFS[fs][0]) is not None, f"{MKFS[fs][0]} (the {fs} tools)")
    with open(path, "wb") as image:
        image.truncate(size_mib << 20)
    run(*MKFS[fs], str(path))
    return path


def mounts_under(base: Path) -> list[Path]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(line.split()[4].replace("\\040", " "))
        if point == base or base in point.parents:
            points.append(point)
    return points


def umount_all(base: Path) -> None:
    """Every mount at or under ``base``, stacked ones too (a bind of the mount base over
    shares mounted before it leaves those beneath it)."""
    for _ in range(8):
        points = mounts_under(base)
        if not points:
            return
        for point in sorted(points, key=lambda p: len(p.parts), reverse=True):
            run("umount", "-l", str(point), check=False)


@pytest.fixture(autouse=True)
def no_mounts_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a test mounted in its temp tree goes with it (a daemon makes its mount base
    a bind mount of itself; shares are mounted inside)."""
    used = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if used is not None:
        umount_all(used)


@pytest.fixture(scope="session")
def loop_supported(tmp_path_factory: pytest.TempPathFactory) -> bool:
    probe = make_ext4_image(tmp_path_factory.mktemp("probe") / "probe.img", 8)
    point = probe.with_suffix(".mnt")
    point.mkdir()
    ok = run("mount", "-o", "loop", "-t", "ext4", str(probe), str(point), check=False)
    run("umount", str(point), check=False)
    return ok.returncode == 0


@pytest.fixture
def ext4_image(tmp_path: Path, loop_supported: bool) -> Callable[..., Path]:
    """Factory: ``ext4_image("a", 64)`` makes a 64 MiB ext4 image file (unmounted)."""
    need(loop_supported, "loop mounts of ext4 images (mount -o loop)")

    def factory(name: str, size_mib: int, fs: str = "ext4") -> Path:
        return make_ext4_image(tmp_path / f"{name}.img", size_mib, fs)

    return factory


@pytest.fixture
def mounted_ext4(tmp_path: Path, loop_supported: bool) -> Iterator[Callable[..., Path]]:
    """Factory: a 64 MiB (or sized) ext4 filesystem mounted at a fresh directory."""
    need(loop_supported, "loop mounts of ext4 images (mount -o loop)")
    base = tmp_path / "mounts"
    base.mkdir()

    def factory(name: str, size_mib: int = 64) -> Path:
        image = make_ext4_image(tmp_path / f"{name}.img", size_mib)
        point = base / name
        point.mkdir()
        run("mount", "-o", "loop", "-t", "ext4", str(image), str(point))
        return point

    yield factory
    umount_all(base)


# ---- a hostvold configured on real loop shares ------------------------------------------

class Host:
    """A hostvold set-up on a temporary state directory, restartable in-process."""

    def __init__(self, root: Path, images: list[Path], extra: str = "",
                 mount_point_base: Path | None = None, fs: str = "ext4") -> None:
        self.root = root
        root.mkdir()
        self.state_dir = root / "state"
        self.shares_file = root / "shares"
        self.shares_file.write_text("".join(f"{img} -t {fs} -o loop\n" for img in images))
        base = f"mount_point_base = {mount_point_base}\n" if mount_point_base else ""
        self.mount_point_base = mount_point_base or self.state_dir / "mnt"
        self.config_text = (f"[daemon]\nstate_dir = {self.state_dir}\n"
                            f"[shares]\nshares_config = {self.shares_file}\n{base}" + extra)
        self.daemon: Daemon | None = None

    @property
    def config(self) -> Config:
        return parse_config(self.config_text, "test.conf")

    @property
    def config_file(self) -> Path:
        path = self.root / "hostvold.conf"
        path.write_text(self.config_text)
        return path

    @property
    def ops(self) -> Operations:
        assert self.daemon is not None and self.daemon.ops is not None
        return self.daemon.ops

    async def start(self) -> Operations:
        self.stop()
        self.daemon = Daemon(self.config, with_libvirt=False)
        return await self.daemon.start()

    def stop(self) -> None:
        if self.daemon is not None:
            for part in (self.daemon.keeper, self.daemon.paths):
                if part is not None:
                    part.stop()
            if self.daemon.index is not None:
                self.daemon.index.close()
        self.daemon = None

    def cleanup(self) -> None:
        self.stop()
        umount_all(self.state_dir)
        umount_all(self.mount_point_base)


@pytest.fixture
def host_factory(tmp_path: Path, ext4_image: Callable[..., Path],
                 libvirtd: str) -> Iterator[Callable[..., Host]]:
    """Hosts on loop-mounted shares; libvirtd runs, as on a compute node (daemons started
    from these configs talk to it)."""
    hosts: list[Host] = []

    def factory(*sizes_mib: int, extra: str = "", mount_point_base: Path | None = None,
                fs: str = "ext4") -> Host:
        images = [ext4_image(f"host{len(hosts)}-share{i}", size, fs)
                  for i, size in enumerate(sizes_mib or (256,))]
        host = Host(tmp_path / f"host{len(hosts)}", images, extra, mount_point_base, fs)
        hosts.append(host)
        return host

    yield factory
    for host in hosts:
        host.cleanup()


@pytest.fixture
async def service(host_factory: Callable[..., Host]) -> AsyncIterator[Operations]:
    """A started hostvold with one 256 MiB ext4 share."""
    host = host_factory(256)
    yield await host.start()
    host.stop()


# ---- libvirtd ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """A running libvirtd on qemu:///system (started here when none runs, stopped after)."""
    need(shutil.which("libvirtd") is not None or Path("/usr/sbin/libvirtd").exists(),
         "libvirtd (Debian package libvirt-daemon)")
    try:
        started = ensure_libvirtd()
    except CannotRun:
        started = []
    need(libvirt_answers(), "libvirtd answering on qemu:///system")
    yield URI
    for name in reversed(started):
        run("pkill", "-x", name, check=False)


# ---- a private system-bus-style dbus-daemon --------------------------------------------

REPO = Path(__file__).resolve().parent.parent
DBUS_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
    <allow send_type="method_call"/>
  </policy>
  {extra}
</busconfig>
"""
# every local user may call every method: only the daemon's own check stands in the way
POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
PERMISSIVE = """<policy context="default"><allow send_type="method_call"/></policy>"""


class PrivateBus:
    """A dbus-daemon of our own, with system-bus rules plus ``extra`` policy."""

    def __init__(self, extra: str) -> None:
        # outside pytest's 0700 temp tree, so unprivileged test users can reach the socket
        self.root = Path(tempfile.mkdtemp(prefix="hostvold-dbus-"))
        self.root.chmod(0o755)
        config = self.root / "system.conf"
        config.write_text(DBUS_POLICY.format(socket=self.root / "socket", extra=extra))
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--nopidfile", "--print-address=1",
             f"--config-file={config}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def bus_factory() -> Iterator[Callable[[str], str]]:
    """Factory of private buses: ``bus_factory("hostvold")`` includes hostvold's own policy
    file (systemd/org.hostvold1.conf), ``"polkit"`` polkitd's too, ``"permissive"`` lets
    anyone call anything, ``""`` is a plain system bus."""
    need(shutil.which("dbus-daemon") is not None, "dbus-daemon (Debian package dbus)")
    buses: list[PrivateBus] = []

    def factory(kind: str) -> str:
        hostvold = f"<include>{REPO / 'systemd' / 'org.hostvold1.conf'}</include>"
        extra = {"": "", "permissive": PERMISSIVE, "hostvold": hostvold,
                 "polkit": f"{hostvold}<include>{POLKIT_BUS_POLICY}</include>"}
        bus = PrivateBus(extra[kind])
        buses.append(bus)
        need(bool(bus.address) and bus.proc.poll() is None, "a private dbus-daemon")
        return bus.address

    yield factory
    for bus in buses:
        bus.close()


@pytest.fixture(scope="session")
def dbus_daemon(bus_factory: Callable[[str], str]) -> str:
    """A private dbus-daemon with system-bus rules; yields its address."""
    return bus_factory("")


# ---- the daemon as a process of its own ---------------------------------------------------

class DaemonProcess:
    """``python -m hostvold`` with a NOTIFY_SOCKET of ours: started() returns at READY=1."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None, command: list[str] | None = None) -> None:
        # a short path of its own: a socket's path must fit in 108 bytes
        self.notify_path = Path(tempfile.mkdtemp(prefix="hvn-")) / "notify.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.listener.bind(str(self.notify_path))
        self.messages: list[tuple[float, str]] = []
        # drained all the time, as systemd does: a full socket would block sd_notify
        self.inbox: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        full_env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), **(env or {}))
        full_env.pop("JOURNAL_STREAM", None)
        self.log_path = config.parent / f"hostvold-{id(self)}.log"
        with open(self.log_path, "w") as log:  # a file, never a pipe that could fill up
            self.proc = subprocess.Popen(
                [*(prefix or []), *(command or [sys.executable, "-m", "hostvold"]),
                 "--config", str(config)],
                env=full_env, cwd=REPO, stderr=log, text=True)

    def log_text(self) -> str:
        return self.log_path.read_text()

    def _drain(self) -> None:
        while True:
            try:
                data = self.listener.recv(4096).decode()
            except OSError:
                return
            self.inbox.put((time.monotonic(), data))

    def receive(self, timeout: float = 30) -> str:
        """The next notification (raises TimeoutError when none comes in time)."""
        try:
            when, data = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no notification from hostvold") from None
        self.messages.append((when, data))
        return data

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any("READY=1" in m for _, m in self.messages):
            if self.proc.poll() is not None:
                raise AssertionError(f"hostvold exited {self.proc.returncode}: "
                                     f"{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"hostvold not ready in {timeout} s: "
                                     f"{self.log_text()[-3000:]}")
            with contextlib.suppress(TimeoutError):
                self.receive(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.listener.close()
        shutil.rmtree(self.notify_path.parent, ignore_errors=True)
        return self.proc.wait()


@pytest.fixture
def daemon_factory(tmp_path: Path, libvirtd: str) -> Iterator[Callable[..., DaemonProcess]]:
    """Daemons of the test's own; libvirtd runs first, as on a compute node (a daemon
    started without it refuses every change until it answers)."""
    started: list[DaemonProcess] = []

    def factory(config: Path, env: dict[str, str] | None = None, wait: bool = True,
                prefix: list[str] | None = None,
                command: list[str] | None = None) -> DaemonProcess:
        """``command`` replaces ``python -m hostvold`` (e.g. an installed hostvold)."""
        process = DaemonProcess(config, env, prefix, command)
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield factory
    for process in started:
        process.stop()
