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

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hostvold-etcd-"))
        self.port, self.peer = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"etcd3+http://127.0.0.1:{self.port}"

    def start(self) -> None:
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "hostvold-test", "--data-dir", str(self.root / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
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

    def config(self, name: str, extra: str = "") -> Path:
        home = self.root / name
        home.mkdir(exist_ok=True)
        (home / "shares").write_text(f"{self.image} -t ext4 -o loop\n")
        address = self.hosts[name][1].address if name in self.hosts else self.bus_factory("")
        path = home / "hostvold.conf"
        path.write_text(
            f"[daemon]\nstate_dir = {home / 'state'}\nbus = {address}\n"
            f"[shares]\nshares_config = {home / 'shares'}\nmount_point_base = {self.mounts}\n"
            f"[coordination]\nbackend_url = {self.backend}\nhost_id = {name}\n"
            f"lease_seconds = 3\n" + extra)
        self.hosts[name] = (path, Cli(address))
        return path

    def add(self, name: str, extra: str = "", env: dict[str, str] | None = None,
            wait: bool = True) -> tuple[DaemonProcess, Cli]:
        process = self.daemon_factory(self.config(name, extra), env=env, wait=wait)
        return process, self.hosts[name][1]

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
