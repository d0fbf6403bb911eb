"""A real network share whose network path the test can cut (a pytest plugin, loaded by
conftest): sshd in a network namespace of the test's own behind a veth pair, served to
``mount -t fuse.sshfs``. An NFS client is not in this kernel; sshfs over a dead link hangs
the same way (requests sleep in the kernel until the server answers or the FUSE connection
is aborted), so a daemon that must not hang on a dead share can be tested for real.

Addresses are 10.233.N.1 (root end) and 10.233.N.2 (sshd) with N free on this machine;
no traffic leaves the rig's own veth pair.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import need

OPTIONS_PATTERN = re.compile(r"[A-Za-z0-9_.,=:/@+\-]*")  # what the daemon accepts as -o
ADDRESS_PATTERN = re.compile(r"^[^\s/]+:/.*$")
SSHD = "/usr/sbin/sshd"
FUSECTL = Path("/sys/fs/fuse/connections")
LOCK = Path("/run/hostvold-sshfs-rig.lock")  # parallel rigs pick their subnets one at a time
TIMEOUT = 10.0  # no command of the rig may hang the test


def sh(*argv: str, check: bool = True, timeout: float = TIMEOUT
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def quietly(*argv: str) -> None:
    """Clean-up: a failing or hanging command must not keep the next step from running."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        sh(*argv, check=False)


def wait_for(ready: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll ``ready`` (set-up only); the seconds it took."""
    started = time.monotonic()
    while not ready():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - started


def mounts() -> list[tuple[int, str, str, str]]:
    """(device, mount point, fstype, source) of each mount, read without touching any of
    them: a ``stat`` of a hung FUSE mount would hang the caller."""
    def unescape(field: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        major, minor = (int(n) for n in parts[2].split(":"))
        found.append((major << 20 | minor, unescape(parts[4]), rest[0], unescape(rest[1])))
    return found


def processes_with(needle: str) -> list[int]:
    """Pids whose command line holds ``needle`` (the rig's own key path: its sshfs and ssh)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
    return pids


class SshfsRig:
    """sshd in namespace ``hvsshfs-TAG`` serving ``export``; ``cut``/``restore`` its link."""

    def __init__(self, tmp_path: Path, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.namespace = f"hvsshfs-{self.tag}"
        self.root_if, self.ns_if = f"hvs{self.tag}r", f"hvs{self.tag}n"
        self.home = tmp_path / "sshfs-rig"
        self.export = tmp_path / "export"
        self.sshd: subprocess.Popen[bytes] | None = None
        self._link: Path | None = None
        self.home.mkdir()
        self.export.mkdir(mode=0o755)
        self.export.chmod(0o755)
        self.server = self.host = ""
        try:
            self._network()
            self._keys()
            self._start_sshd()
        except BaseException:
            self.close()
            raise

    def _network(self) -> None:
        with LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = set(re.findall(r"inet 10\.233\.(\d+)\.", sh("ip", "-o", "-4", "addr").stdout))
            free = [n for n in range(1, 255) if str(n) not in used]
            assert free, "no free 10.233.N.0/30 subnet"
            subnet = random.choice(free)
            self.host, self.server = f"10.233.{subnet}.1", f"10.233.{subnet}.2"
            sh("ip", "netns", "add", self.namespace)
            sh("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if,
               "netns", self.namespace)
            sh("ip", "addr", "add", f"{self.host}/30", "dev", self.root_if)
            sh("ip", "link", "set", self.root_if, "up")
        sh("ip", "-n", self.namespace, "addr", "add", f"{self.server}/30", "dev", self.ns_if)
        sh("ip", "-n", self.namespace, "link", "set", self.ns_if, "up")
        sh("ip", "-n", self.namespace, "link", "set", "lo", "up")
        self._pin_neighbour()

    def _pin_neighbour(self) -> None:
        """A permanent ARP entry for sshd: with the link cut, an expiring entry would fail a
        reconnect within ~3 s (EHOSTUNREACH); pinned, its SYNs are dropped and it waits."""
        shown = json.loads(sh("ip", "-n", self.namespace, "-j", "link", "show", self.ns_if).stdout)
        sh("ip", "neigh", "replace", self.server, "lladdr", shown[0]["address"], "dev",
           self.root_if, "nud", "permanent")

    def _keys(self) -> None:
        keys = self.home
        if not OPTIONS_PATTERN.fullmatch(str(keys)):  # e.g. a parametrized test's [..] name
            self._link = Path(f"/tmp/hvsshfs-{self.tag}")
            self._link.symlink_to(keys)
            keys = self._link
        self.key = keys / "client_key"
        for name in ("host_key", "client_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hvsshfs-{self.tag}",
               "-f", str(self.home / name))
        (self.home / "authorized_keys").write_text((self.home / "client_key.pub").read_text())

    def _start_sshd(self) -> None:
        config, log = self.home / "sshd_config", self.home / "sshd.log"
        config.write_text(
            f"Port 22\nListenAddress {self.server}\nHostKey {self.home / 'host_key'}\n"
            f"AuthorizedKeysFile {self.home / 'authorized_keys'}\n"
            f"PidFile {self.home / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nUseDNS no\nLogLevel VERBOSE\nSubsystem sftp internal-sftp\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        with log.open("ab") as errors:
            self.sshd = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, SSHD, "-D", "-f", str(config),
                 "-E", str(log)], stdin=subprocess.DEVNULL, stdout=errors, stderr=errors)
        sshd = self.sshd

        def listening() -> bool:
            if sshd.poll() is not None:
                raise AssertionError(f"sshd exited {sshd.returncode}: {log.read_text()}")
            return self.reachable()
        wait_for(listening, 10, "sshd on its port")

    def reachable(self) -> bool:
        """sshd's port answers from the root namespace."""
        with socket.socket() as probe:
            probe.settimeout(0.5)
            return probe.connect_ex((self.server, 22)) == 0

    @property
    def address(self) -> str:
        return f"root@{self.server}:{self.export}"

    @property
    def options(self) -> str:
        """The ``-o`` of ``mount -t fuse.sshfs``: no prompt, no known_hosts, a dead link seen
        by ssh within ~4 s (ServerAlive) and reconnected on the next request; dir_cache=no so
        that every stat asks the server (a cached answer would hide a dead share)."""
        return ",".join([
            f"IdentityFile={self.key}", "IdentitiesOnly=yes", "BatchMode=yes",
            "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR",
            "ServerAliveInterval=1", "ServerAliveCountMax=3", "reconnect", "dir_cache=no",
            "allow_other"])

    @property
    def shares_line(self) -> str:
        return f"{self.address} -t fuse.sshfs -o {self.options}"

    def cut(self) -> None:
        """Down the namespace end. The root end stays up with no carrier, so its route stays
        and packets are dropped silently: requests (and sshfs's reconnects) wait, as on a
        dead NFS server. Downing the root end drops the route instead, and a reconnect fails
        at once with ENETUNREACH (EIO) once ssh has given up."""
        sh("ip", "-n", self.namespace, "link", "set", self.ns_if, "down")

    def restore(self) -> None:
        """Both ends up, addresses back if a test took them away; returns once sshd answers."""
        sh("ip", "link", "set", self.root_if, "up")
        sh("ip", "-n", self.namespace, "link", "set", self.ns_if, "up")
        sh("ip", "addr", "replace", f"{self.host}/30", "dev", self.root_if)
        sh("ip", "-n", self.namespace, "addr", "replace", f"{self.server}/30", "dev", self.ns_if)
        self._pin_neighbour()
        wait_for(self.reachable, 10, "sshd after restore")

    def client_pids(self) -> list[int]:
        """The ssh clients that sshfs runs for this rig (none while it is between sessions)."""
        return [pid for pid in processes_with(str(self.key))
                if Path(f"/proc/{pid}/comm").read_text().strip() == "ssh"]

    def release(self, mount_point: Path | str) -> None:
        """Abort the mount's FUSE connection, then detach it: every request sleeping on it
        fails with ENOTCONN. Aborting first, since ``umount`` itself may stat the mount."""
        point = os.path.abspath(mount_point)  # no resolve(): it would stat a hung mount
        if not any(fstype == "fusectl" for _, _, fstype, _ in mounts()):
            quietly("mount", "-t", "fusectl", "none", str(FUSECTL))
        for _ in range(8):  # mounts stacked on one point go one by one
            devices = [dev for dev, where, _, _ in mounts() if where == point]
            if not devices:
                return
            with contextlib.suppress(OSError):
                (FUSECTL / str(devices[-1]) / "abort").write_text("1")
            quietly("umount", "-l", point)

    def close(self) -> None:
        """Everything the rig made goes, whatever state the test left it in."""
        if self.server:
            for _, point, fstype, source in reversed(mounts()):
                if fstype == "fuse.sshfs" and source == self.address:
                    self.release(point)
        for pid in processes_with(str(self.home)) + (processes_with(str(self._link))
                                                      if self._link else []):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.sshd is not None:
            with contextlib.suppress(OSError):
                self.sshd.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sshd.wait(TIMEOUT)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            for pid in sh("ip", "netns", "pids", self.namespace, check=False).stdout.split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)  # sshd's per-session children
        quietly("ip", "netns", "del", self.namespace)
        quietly("ip", "link", "del", self.root_if)
        if self._link is not None:
            with contextlib.suppress(OSError):
                self._link.unlink()


@pytest.fixture
def sshfs_rig(tmp_path: Path) -> Iterator[SshfsRig]:
    need(os.geteuid() == 0, "root (network namespaces, mounts)")
    for tool in ("sshfs", "ssh", "ssh-keygen", "ip", "mount.fuse3"):
        need(shutil.which(tool) is not None, f"{tool} (apt-get install sshfs openssh-server "
                                              "fuse3 iproute2)")
    need(os.access(SSHD, os.X_OK), f"{SSHD} (openssh-server)")
    need(Path("/dev/fuse").exists(), "/dev/fuse")
    rig = SshfsRig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()
