"""A second libvirt host on this machine, for live migration (SPEC section 17), and two
hostvolds on one share with one etcd (a pytest plugin, loaded by conftest).

Host A is the machine's own libvirtd. Host B is a ``virtlogd`` + ``libvirtd`` in network,
mount and UTS namespaces of the test's own: a veth pair with a /30 the test picks (traffic
stays between the two ends), its own hostname, ``host_uuid`` (libvirt refuses a migration
to "the same host") and private ``/run/libvirt``, ``/etc/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt`` and ``/var/cache/libvirt`` bound over the real ones. Its mount
namespace is a slave of the host's, made after the module's shared mount base, so shares
mounted under that base later reach B's QEMUs at the same paths as A's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tests.cluster_fixtures import Etcd
from tests.conftest import DaemonProcess, Host, make_ext4_image, need, run, umount_all
from tests.test_dbus import Cli, with_bus

PRIVATE = ("run/libvirt", "etc/libvirt", "var/lib/libvirt", "var/log/libvirt",
           "var/cache/libvirt")
START_B = """set -e
hostname {hostname}
for d in {private}; do
    mkdir -p "{root}/$d" "/$d"
    mount --bind "{root}/$d" "/$d"
done
virtlogd -d -p {root}/virtlogd.pid
libvirtd -d --listen -p {root}/libvirtd.pid
"""


def free_subnet() -> int:
    """N of a 10.234.N.0/30 no interface or route of this machine uses."""
    taken = run("ip", "-o", "-4", "addr").stdout + run("ip", "-4", "route").stdout
    return next(n for n in range(1, 250) if f"10.234.{n}." not in taken)


@dataclass
class LibvirtHost:
    name: str
    uri: str
    address: str  # where migrations to this host go
    root: Path | None = None  # B's private tree (None: the machine's own libvirtd)

    def pid_of_qemu(self, domain: str) -> int:
        assert self.root is not None
        return int((self.root / "run/libvirt/qemu" / f"{domain}.pid").read_text())


class SecondHost:
    """libvirt host B; close() ends its domains, daemons, namespace and files."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hostvold-hostb-"))
        self.root.chmod(0o755)
        self.subnet = free_subnet()
        self.namespace = f"hvmig{self.subnet}"
        self.a_if, self.b_if = f"hvma{self.subnet}", f"hvmb{self.subnet}"
        self.a_address, self.b_address = f"10.234.{self.subnet}.1", f"10.234.{self.subnet}.2"
        self.uri = f"qemu+tcp://{self.b_address}/system"
        try:
            self._network()
            self._configs()
            run("ip", "netns", "exec", self.namespace, "unshare", "--mount", "--uts",
                "--propagation", "slave", "--fork", "sh", "-c", START_B.format(
                    hostname="hostvold-b", private=" ".join(PRIVATE), root=self.root))
            self._wait_answering()
        except BaseException:
            self.close()
            raise

    def _network(self) -> None:
        run("ip", "netns", "add", self.namespace)
        run("ip", "link", "add", self.a_if, "type", "veth", "peer", "name", self.b_if,
            "netns", self.namespace)
        run("ip", "addr", "add", f"{self.a_address}/30", "dev", self.a_if)
        run("ip", "link", "set", self.a_if, "up")
        inside = ["ip", "netns", "exec", self.namespace, "ip"]
        run(*inside, "addr", "add", f"{self.b_address}/30", "dev", self.b_if)
        run(*inside, "link", "set", self.b_if, "up")
        run(*inside, "link", "set", "lo", "up")

    def _configs(self) -> None:
        etc = self.root / "etc/libvirt"
        shutil.copytree("/etc/libvirt", etc)
        with open(etc / "libvirtd.conf", "a") as conf:
            conf.write(f'\nlisten_tls = 0\nlisten_tcp = 1\nlisten_addr = "{self.b_address}"\n'
                       f'auth_tcp = "none"\nhost_uuid = "{uuid.uuid4()}"\n')
        with open(etc / "qemu.conf", "a") as conf:
            conf.write(f'\nmigration_address = "{self.b_address}"\n'
                       f'migration_host = "{self.b_address}"\n'
                       "migration_port_min = 49152\nmigration_port_max = 49215\n")

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + 30
        while run("virsh", "-c", self.uri, "version", check=False).returncode != 0:
            assert time.monotonic() < deadline, "libvirtd of host B does not answer"
            time.sleep(0.1)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(self.uri)
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
            conn.close()
        for daemon in ("libvirtd", "virtlogd"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((self.root / f"{daemon}.pid").read_text()), signal.SIGTERM)
        for pid in run("ip", "netns", "pids", self.namespace, check=False).stdout.split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        run("ip", "link", "del", self.a_if, check=False)
        run("ip", "netns", "del", self.namespace, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def libvirt_hosts(libvirtd: str, guest_mounts: Path) -> Iterator[tuple[LibvirtHost, LibvirtHost]]:
    """(A, B): the machine's libvirtd and a second one in namespaces of its own."""
    need(shutil.which("unshare") is not None and shutil.which("ip") is not None,
         "unshare and ip (util-linux, iproute2)")
    second = SecondHost()
    try:
        yield (LibvirtHost("host-a", libvirtd, second.a_address),
               LibvirtHost("host-b", second.uri, second.b_address, second.root))
    finally:
        second.close()


@dataclass
class ClusterHost:
    """One hostvold of the pair: its libvirt host, its config, its client."""

    libvirt: LibvirtHost
    host: Host
    config: Path
    cli: Cli
    process: DaemonProcess | None = None


@pytest.fixture
def migration_cluster(tmp_path: Path, guest_mounts: Path, bus_factory: Callable[[str], str],
                      daemon_factory: Callable[..., DaemonProcess],
                      libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
                      loop_supported: bool) -> Iterator[tuple[ClusterHost, ClusterHost]]:
    """A hostvold for each libvirt host: distinct host ids, buses and state directories,
    one etcd both reach, one share mounted once under the module's shared mount base
    (so both hosts' QEMUs see it at the same path)."""
    need(shutil.which("etcd") is not None, "etcd (Debian package etcd-server)")
    need(loop_supported, "loop mounts of ext4 images (mount -o loop)")
    etcd = Etcd()
    base = guest_mounts / f"m{time.monotonic_ns()}"
    image = make_ext4_image(tmp_path / "share.img", 768)
    from hostvold.core.shares import share_hash
    point = base / share_hash(str(image))
    point.mkdir(parents=True)
    base.chmod(0o755)
    run("mount", "-o", "loop", "-t", "ext4", str(image), str(point))
    hosts = []
    try:
        for lv in libvirt_hosts:
            # 0666 files, as Cinder's NFS driver makes them without secure permissions:
            # libvirt counts only network filesystems as shared, so on this local one the
            # host a guest left gives its files back to root when its QEMU ends
            extra = ("[volumes]\nnas_secure_file_permissions = false\n"
                     f"[libvirt]\nuri = {lv.uri}\nquiesce = try\n"
                     f"[coordination]\nbackend_url = {etcd.url}\nhost_id = {lv.name}\n"
                     "lease_seconds = 5\n")
            host = Host(tmp_path / lv.name, [image], extra, mount_point_base=base)
            address = bus_factory("hostvold")
            config = with_bus(host, address)
            hosts.append(ClusterHost(lv, host, config, Cli(address),
                                     daemon_factory(config)))
        yield hosts[0], hosts[1]
    finally:
        for cluster_host in hosts:
            if cluster_host.process is not None:
                cluster_host.process.stop()
        umount_all(base)
        etcd.close()
