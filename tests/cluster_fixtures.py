"""Fixtures for many hosts on one share: a real etcd (Debian's etcd-server) and daemons that
act as separate hosts (own state directories, own buses, own host ids) over one share image
mounted once (a pytest plugin, loaded by conftest)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, make_ext4_image, need, umount_all
from tests.test_dbus import Cli


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Etcd:
    """One etcd member on loopback, data in a temp dir."""

    def __init__(self, prefix: list[str] | None = None, address: str = "127.0.0.1") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hostvold-etcd-"))
        self.port, self.peer = free_port(), free_port()
        self.prefix, self.address = prefix or [], address
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url_at(self, address: str) -> str:
        return f"etcd3+http://{address}:{self.port}"

    @property
    def url(self) -> str:
        return self.url_at(self.address)

    def start(self) -> None:
        listen = "0.0.0.0" if self.prefix else "127.0.0.1"
        client, peer = f"http://{self.address}:{self.port}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            [*self.prefix, "etcd", "--name", "hostvold-test",
             "--data-dir", str(self.root / "data"),
             "--listen-client-urls", f"http://{listen}:{self.port}",
             "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"hostvold-test={peer}"],
            stdout=subprocess.DEVNULL, stderr=(self.root / "etcd.log").open("ab"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the test waits for its own etcd to answer
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as answer:
                    if b"true" in answer.read():
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("etcd did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    need(shutil.which("etcd") is not None, "etcd (Debian package etcd-server)")
    server = Etcd()
    yield server
    server.close()


class Cluster:
    """Hosts over one shared ext4 image: ``add("a")`` starts a daemon acting as host a."""

    def __init__(self, root: Path, bus_factory: Callable[[str], str],
                 daemon_factory: Callable[..., DaemonProcess], backend: str,
                 image_mib: int = 512, mounts: Path | None = None) -> None:
        self.root = root
        self.bus_factory = bus_factory
        self.daemon_factory = daemon_factory
        self.backend = backend
        self.image = make_ext4_image(root / "share.img", image_mib)
        # the same mount point on every host, mounted once
        self.mounts = mounts or root / "mnt"
        self.mounts.mkdir(exist_ok=True)
        self.hosts: dict[str, tuple[Path, Cli]] = {}
        self.backends: dict[str, str] = {}  # hosts that reach etcd at another address
        self.rescan = 30  # seconds between share rescans (the etcd watch needs none)
        self.lease = 3  # seconds a host stays a member without renewing

    def config(self, name: str, extra: str = "", host_id: str | None = None) -> Path:
        home = self.root / name
        home.mkdir(exist_ok=True)
        (home / "shares").write_text(f"{self.image} -t ext4 -o loop\n")
        address = self.hosts[name][1].address if name in self.hosts else self.bus_factory("")
        path = home / "hostvold.conf"
        path.write_text(
            f"[daemon]\nstate_dir = {home / 'state'}\nbus = {address}\n"
            f"[shares]\nshares_config = {home / 'shares'}\nmount_point_base = {self.mounts}\n"
            f"[coordination]\nbackend_url = {self.backends.get(name, self.backend)}\n"
            f"host_id = {host_id or name}\nlease_seconds = {self.lease}\n"
            f"rescan_interval = {self.rescan}\n" + extra)
        self.hosts[name] = (path, Cli(address))
        return path

    def add(self, name: str, extra: str = "", env: dict[str, str] | None = None,
            wait: bool = True, prefix: list[str] | None = None,
            backend: str | None = None, host_id: str | None = None
            ) -> tuple[DaemonProcess, Cli]:
        """Start host ``name`` (its own state, bus and, unless ``host_id`` says another,
        host id)."""
        if backend is not None:
            self.backends[name] = backend
        process = self.daemon_factory(self.config(name, extra, host_id), env=env, wait=wait,
                                      prefix=prefix)
        return process, self.hosts[name][1]

    def start(self, count: int = 3) -> list[Cli]:
        """``count`` hosts (a, b, c, ...), three by default."""
        return [self.add(chr(ord("a") + index))[1] for index in range(count)]

    def close(self) -> None:
        umount_all(self.mounts)


@pytest.fixture
def cluster(tmp_path: Path, bus_factory: Callable[[str], str],
            daemon_factory: Callable[..., DaemonProcess], loop_supported: bool,
            etcd: Etcd) -> Iterator[Cluster]:
    need(loop_supported, "loop mounts of ext4 images (mount -o loop)")
    (tmp_path / "cluster").mkdir()
    made = Cluster(tmp_path / "cluster", bus_factory, daemon_factory, etcd.url)
    yield made
    made.close()




@pytest.fixture
def live_cluster(tmp_path: Path, bus_factory: Callable[[str], str],
                 daemon_factory: Callable[..., DaemonProcess], loop_supported: bool,
                 etcd: Etcd, shared_base: Path) -> Iterator[Cluster]:
    """A cluster whose share QEMU's user can reach (for attached volumes)."""
    need(loop_supported, "loop mounts of ext4 images (mount -o loop)")
    (tmp_path / "cluster").mkdir()
    made = Cluster(tmp_path / "cluster", bus_factory, daemon_factory, etcd.url,
                   mounts=shared_base / "cluster")
    yield made
    made.close()


class Network:
    """Network namespaces of the test's own: etcd in one, a host cut off in another.

    root <-veth-> etcd namespace <-veth-> host namespace; the host reaches etcd over its
    own link, which the test can take down (a dead network, as for an NFS server)."""

    def __init__(self, tag: str) -> None:
        self.etcd_ns, self.host_ns = f"hv-etcd-{tag}", f"hv-host-{tag}"
        self.root_if, self.host_if = f"hve{tag}", f"hvh{tag}"
        self.etcd_for_root, self.etcd_for_host = "10.231.0.2", "10.231.1.2"
        commands = [
            ["ip", "netns", "add", self.etcd_ns], ["ip", "netns", "add", self.host_ns],
            ["ip", "link", "add", self.root_if, "type", "veth", "peer", "name", "e0"
             + tag, "netns", self.etcd_ns],
            ["ip", "link", "add", self.host_if, "netns", self.host_ns, "type", "veth", "peer",
             "name", "e1" + tag, "netns", self.etcd_ns],
            ["ip", "addr", "add", "10.231.0.1/30", "dev", self.root_if],
            ["ip", "link", "set", self.root_if, "up"],
            *self._in(self.etcd_ns, ["ip", "addr", "add", "10.231.0.2/30", "dev", "e0" + tag],
                      ["ip", "addr", "add", "10.231.1.2/30", "dev", "e1" + tag],
                      ["ip", "link", "set", "e0" + tag, "up"],
                      ["ip", "link", "set", "e1" + tag, "up"], ["ip", "link", "set", "lo", "up"]),
            *self._in(self.host_ns, ["ip", "addr", "add", "10.231.1.1/30", "dev", self.host_if],
                      ["ip", "link", "set", self.host_if, "up"],
                      ["ip", "link", "set", "lo", "up"]),
        ]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)

    @staticmethod
    def _in(namespace: str, *commands: list[str]) -> list[list[str]]:
        return [["ip", "netns", "exec", namespace, *command] for command in commands]

    def exec_prefix(self, namespace: str) -> list[str]:
        return ["ip", "netns", "exec", namespace]

    def cut_host(self) -> None:
        subprocess.run(self._in(self.host_ns, ["ip", "link", "set", self.host_if, "down"])[0],
                       check=True)

    def close(self) -> None:
        for namespace in (self.host_ns, self.etcd_ns):
            subprocess.run(["ip", "netns", "pids", namespace], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.root_if], capture_output=True)
