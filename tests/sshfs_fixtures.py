"""A real network share whose link the test can cut (a pytest plugin, loaded by conftest):
sshd in a network namespace of the test's own behind a veth pair (10.233.N.1 root end,
10.233.N.2 sshd, N free here), mounted with ``mount -t fuse.sshfs``. This kernel has no NFS
client; sshfs over a dead link hangs the same way (requests sleep in the kernel until the
server answers or the FUSE connection is aborted). No traffic leaves the veth pair."""

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
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        line = re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal[1], 8)), line)
        parts, rest = (half.split() for half in line.split(" - ", 1))
        major, minor = (int(n) for n in parts[2].split(":"))  # kernel dev_t: fusectl's name
        found.append((major << 20 | minor, parts[4], rest[0], rest[1]))
    return found


def processes_with(needle: str) -> list[int]:
    """Pids whose command line holds ``needle`` (a path of the rig's own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


class SshfsRig:
    """sshd in namespace ``hvsshfs-TAG`` serving ``export``; ``cut``/``restore`` its link."""

    def __init__(self, tmp_path: Path, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)  # interface names hvsTAGr/hvsTAGn: <= 15
        self.namespace = f"hvsshfs-{self.tag}"
        self.root_if, self.ns_if = f"hvs{self.tag}r", f"hvs{self.tag}n"
        self.home, self.export = tmp_path / "sshfs-rig", tmp_path / "export"
        self.key = self.home / "client_key"
        self.sshd: subprocess.Popen[bytes] | None = None
        self.server = self.host = self.subnet = ""
        # the key's path goes into the -o string, which the daemon checks against a pattern
        assert OPTIONS_PATTERN.fullmatch(str(self.key)), f"{self.key}: rename the base temp"
        self.home.mkdir()
        self.export.mkdir()
        self.export.chmod(0o755)
        try:
            self._network()
            self._start_sshd()
        except BaseException:
            self.close()
            raise

    def _network(self) -> None:
        with LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = sh("ip", "-o", "-4", "addr").stdout + sh("ip", "-4", "route").stdout
            used = set(re.findall(r"\b10\.233\.(\d+)\.", taken))
            n = random.choice([n for n in range(1, 255) if str(n) not in used])
            self.host, self.server = f"10.233.{n}.1", f"10.233.{n}.2"
            # behind the link's own route: with the root end down, never the default route
            sh("ip", "route", "add", "unreachable", f"10.233.{n}.0/30", "metric", "4000")
            self.subnet = f"10.233.{n}.0/30"
            sh("ip", "netns", "add", self.namespace)
            sh("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if,
               "netns", self.namespace)
            sh("ip", "addr", "add", f"{self.host}/30", "dev", self.root_if)
        self._up()

    def _up(self) -> None:
        """Links up with their addresses; sshd's ARP entry pinned: with the link cut, an
        expiring entry fails a reconnect within ~3 s (EHOSTUNREACH); pinned, its SYNs are
        dropped and it waits."""
        inside = ("ip", "-n", self.namespace)
        sh("ip", "link", "set", self.root_if, "up")
        sh(*inside, "link", "set", "lo", "up")
        sh(*inside, "link", "set", self.ns_if, "up")
        sh("ip", "addr", "replace", f"{self.host}/30", "dev", self.root_if)
        sh(*inside, "addr", "replace", f"{self.server}/30", "dev", self.ns_if)
        mac = json.loads(sh(*inside, "-j", "link", "show", self.ns_if).stdout)[0]["address"]
        sh("ip", "neigh", "replace", self.server, "lladdr", mac, "dev", self.root_if,
           "nud", "permanent")

    def _start_sshd(self) -> None:
        for name in ("host_key", "client_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hvsshfs-{self.tag}",
               "-f", str(self.home / name))
        (self.home / "authorized_keys").write_text((self.home / "client_key.pub").read_text())
        config, log = self.home / "sshd_config", self.home / "sshd.log"
        config.write_text(
            f"Port 22\nListenAddress {self.server}\nHostKey {self.home / 'host_key'}\n"
            f"AuthorizedKeysFile {self.home / 'authorized_keys'}\n"
            f"PidFile {self.home / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nUseDNS no\nLogLevel VERBOSE\nSubsystem sftp internal-sftp\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        with log.open("ab") as errors:
            self.sshd = sshd = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, SSHD, "-D", "-f", str(config),
                 "-E", str(log)], stdin=subprocess.DEVNULL, stdout=errors, stderr=errors)

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
        """Down the namespace end: the root end stays up without carrier, its route and the
        pinned ARP entry stay, and packets for sshd vanish without an error, as on a dead NFS
        server. ssh gives up after ~4 s (requests in flight fail with EIO); each request after
        that sleeps in sshfs's reconnect until the link is back (or the SYNs run out, ~2 min).
        With the root end down, every reconnect would fail at once (EHOSTUNREACH)."""
        sh("ip", "-n", self.namespace, "link", "set", self.ns_if, "down")

    def restore(self) -> None:
        """Both ends up, addresses back if a test took them away; returns once sshd answers."""
        self._up()
        wait_for(self.reachable, 10, "sshd after restore")

    def client_pids(self) -> list[int]:
        """The ssh clients that sshfs runs for this rig (none while it is between sessions)."""
        return processes_with(f"-oIdentityFile={self.key}")  # sshfs has it as "-o a,b"

    def processes(self) -> list[int]:
        """Every process running for the rig: sshd and its sessions, sshfs, ssh."""
        return processes_with(f"{self.home}/")

    def release(self, mount_point: Path | str) -> None:
        """Abort the mount's FUSE connection, then detach it: every request sleeping on it
        fails with ENOTCONN. Aborting first, since ``umount`` itself may stat the mount."""
        point = os.path.abspath(mount_point)  # no resolve(): it would stat a hung mount
        if not any(fstype == "fusectl" for _, _, fstype, _ in mounts()):
            quietly("mount", "-t", "fusectl", "none", str(FUSECTL))
        stacked = [dev for dev, where, kind, _ in mounts() if where == point and "fuse" in kind]
        for dev in reversed(stacked):  # the top one first
            with contextlib.suppress(OSError):
                (FUSECTL / str(dev) / "abort").write_text("1")
            quietly("umount", "-l", point)

    def close(self) -> None:
        """Everything the rig made goes, whatever state the test left it in."""
        for _, point, fstype, source in reversed(mounts()):
            if fstype == "fuse.sshfs" and source == self.address and self.server:
                self.release(point)
        pids = self.processes()  # sshfs, ssh, sshd; then sshd's sessions in the namespace
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            pids += map(int, sh("ip", "netns", "pids", self.namespace, check=False).stdout.split())
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.sshd is not None:  # our child, reaped here; orphans are reaped by pid 1
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sshd.wait(TIMEOUT)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 3, "reaped")
        quietly("ip", "netns", "del", self.namespace)
        quietly("ip", "link", "del", self.root_if)
        if self.subnet:
            quietly("ip", "route", "del", "unreachable", self.subnet, "metric", "4000")


@pytest.fixture
def sshfs_rig(tmp_path: Path) -> Iterator[SshfsRig]:
    """Function-scoped: a rig of its own (random tag, free subnet) for every test."""
    need(os.geteuid() == 0, "root (network namespaces, mounts)")
    for tool in ("sshfs", "ssh", "ssh-keygen", "ip", "mount.fuse3", SSHD, "/dev/fuse"):
        need(shutil.which(tool) is not None or Path(tool).exists(),
             f"{tool} (apt-get install sshfs openssh-server fuse3 iproute2)")
    rig = SshfsRig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()
