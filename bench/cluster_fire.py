"""A Jepsen-style check of many hosts on one share (SPEC section 8), under faults.

    python -m bench.cluster_fire --minutes M [--hosts 3] [--seed S] [--lease 6] [--dir D]
        [--workers 3] [--faults kill,pause-host,pause-daemon,cut,etcd] [--settle 60]
        [--agree 15] [--keep]

The rig: hosts ``a``, ``b``, ``c``, one hostvold each (own state directory, own private
dbus-daemon, libvirt's test driver), over one loop-mounted ext4 share (mounted once, before
any daemon starts) and one real etcd in the root network namespace. Each daemon runs in a
network namespace of its own, reaching etcd over a veth link, and in a session of its own,
so that the whole host (the daemon and all it started, in any process group) is found by
its session id in /proc.

The workload: workers send random operations to random hosts through ``hostvolctl``
(create, snapshot create and delete, clone, volume from a snapshot, revert, delete) and
write patterns into the active files of their own volumes with ``qemu-io``. Other workers
make snapshots and copies of a worker's volumes and delete their snapshots, from other
hosts, for lock contention; hostvold orders those itself, and none changes the active data,
so their effects on the model commute. A write, a revert and a delete run alone on their
volume. Every call goes into the history: invoke and completion time, host, outcome (ok;
failed with the error's name; unknown: a timeout, a daemon gone meanwhile, a bus error).

The model: what must exist, holding what. A failure that says nothing was done (NotFound,
Busy, InvalidState, ...) changes nothing; any other failure or an unknown outcome may take
effect now or later (a host finishes or undoes what it recorded), so the model allows both
and the volume is frozen: no more work goes to it, and whenever that operation lands, the
end state is one of the two the checker knows.

The nemesis, at random moments (half of them while the host runs a qemu-img), one fault at
a time or two on different hosts, each healed after a while: SIGKILL of a whole host then a
restart; SIGSTOP of a whole host, or of its daemon alone, for longer than the lease; the
host's link to etcd down; etcd stopped and started again on the same data.

The checker, with every fault healed and the hosts settled (all up, members, no job running,
no operation recorded on the share): the hosts show the same volumes, snapshots and active
files, and so does the share's info file; every volume and snapshot acknowledged and not
deleted exists, nothing deleted or refused does, nothing appeared that no call named, no
volume has problems or stray files, and every point in time reads back whole (qemu-io
``read -P`` of every region: the active file; for a snapshot, the file its overlay is backed
by). From the daemons' logs: a ``STEP begin``/``end``/``killed`` pair is a qemu-img child's
interval on a volume, a ``STEP record`` an instant; intervals of two hosts on one volume
must never overlap. Anomalies (a hostvold bug's ``Failed``, NotFound from a stale host, a
record logged just before a stop that may have been written after it) are listed, not
counted.

The last line is ``cluster_fire: N operations, F faults, V violations``; exit status 0 when
V is 0, else 1 (2: the rig could not be built). Logs and the history are kept (path printed)
when a violation was found (or with ``--keep``); everything else is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST_NAMES = "abcdefgh"
VOLUME_MIB = 32
REGION = 2 << 20  # the unit of a patterned write and of every check
REGIONS = (VOLUME_MIB << 20) // REGION
CALL_TIMEOUT = 40.0  # a call still running then counts as unknown
FAULT_KINDS = ("kill", "pause-host", "pause-daemon", "cut", "etcd")
# errors that say the call changed nothing (refused before any side effect); any other
# failure may have left an operation recorded that a host finishes later: indeterminate
REFUSALS = frozenset({"NotFound", "InvalidArgument", "AlreadyExists", "InvalidState", "InUse",
                      "Busy", "NotAuthorized", "NotRunning", "BusUnreachable", "UsageError"})
Content = tuple[int | None, ...]  # pattern byte per region; None: anything is accepted

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


class RigError(Exception):
    """The rig (etcd, namespaces, buses, daemons) could not be built or kept up."""


_started = time.monotonic()


def say(text: str) -> None:
    """A progress line, with the seconds since the bench started."""
    print(f"[{time.monotonic() - _started:7.1f}s] {text}", flush=True)


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A set-up command; a failure names the command and what it printed."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RigError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise RigError(f"{what} (after {seconds:.0f} s)")
        time.sleep(0.1)


# ---- processes of a host: its session ----------------------------------------------------

def session_pids(session: int) -> list[int]:
    """Every live process of ``session`` (zombies left out: they cannot run any more)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def signal_pids(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


# ---- the rig: etcd, links, buses, hosts --------------------------------------------------

class Etcd:
    """One etcd member in the root namespace, listening on loopback and on the root end of
    every host's link; restarted on the same data directory and port (a fault)."""

    def __init__(self, root: Path, addresses: list[str]) -> None:
        self.root, self.port, self.peer = root, free_port(), free_port()
        self.addresses = ["127.0.0.1", *addresses]
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()  # a fault's restart never races the final stop
        self.closed = False

    def start(self) -> None:
        with self.lock:
            if self.closed:
                raise RigError("etcd is closed")
            self._start()
        wait_until(self.healthy, 30, "etcd did not become healthy")

    def _start(self) -> None:
        clients = ",".join(f"http://{a}:{self.port}" for a in self.addresses)
        peer = f"http://127.0.0.1:{self.peer}"
        with open(self.root / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "fire", "--data-dir", str(self.root / "etcd"),
                 "--listen-client-urls", clients,
                 "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"fire={peer}"],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RigError(f"etcd exited: see {self.root / 'etcd.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                        timeout=1) as answer:
                return b"true" in answer.read()
        except OSError:
            return False

    def stop(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.stop()


class Link:
    """A host's network namespace and its veth to the root namespace, where etcd listens;
    taking the inner end down cuts the host from etcd (and only from etcd: its bus is a
    socket file, its share a local mount)."""

    def __init__(self, tag: str, name: str, index: int, net: int) -> None:
        self.name, self.ns = name, f"hvfire-{tag}-{name}"
        self.outer, self.inner = f"hvf{tag}{name}o", f"hvf{tag}{name}i"
        self.gateway, self.address = f"10.{net}.{index}.1", f"10.{net}.{index}.2"
        self.made = False

    def create(self) -> None:
        self.made = True
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner,
           "netns", self.ns)
        sh("ip", "addr", "add", f"{self.gateway}/30", "dev", self.outer)
        sh("ip", "link", "set", self.outer, "up")
        self.inside("ip", "addr", "add", f"{self.address}/30", "dev", self.inner)
        self.inside("ip", "link", "set", self.inner, "up")
        self.inside("ip", "link", "set", "lo", "up")

    def inside(self, *argv: str) -> None:
        sh("ip", "netns", "exec", self.ns, *argv)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def cut(self) -> None:
        self.inside("ip", "link", "set", self.inner, "down")

    def heal(self) -> None:
        self.inside("ip", "link", "set", self.inner, "up")

    def close(self) -> None:
        if self.made:
            sh("ip", "netns", "del", self.ns, check=False)
            sh("ip", "link", "del", self.outer, check=False)


class Bus:
    """A private dbus-daemon: each host has its own bus, as each compute node has."""

    def __init__(self, home: Path) -> None:
        config = home / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=home / "bus.sock"))
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--nopidfile", "--print-address=1",
             f"--config-file={config}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RigError("dbus-daemon did not start")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Host:
    """One hostvold acting as host ``name``, started in its netns and a session of its own.
    Its log (stderr, appended over restarts) holds the STEP lines the checker reads."""

    def __init__(self, name: str, home: Path, sockets: Path, link: Link, config: str) -> None:
        self.name, self.home, self.link = name, home, link
        home.mkdir()
        sockets.mkdir()
        self.bus = Bus(sockets)
        self.config = home / "hostvold.conf"
        self.config.write_text(config.format(bus=self.bus.address))
        self.log = home / "hostvold.log"
        self.notify_path = sockets / "notify.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.listener.bind(str(self.notify_path))
        self.inbox: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.lock = threading.Lock()  # a fault's restart never races the final stop
        self.closed = False

    def _drain(self) -> None:
        """Read every notification, as systemd does: a full socket would block the daemon."""
        while True:
            try:
                self.inbox.put(self.listener.recv(4096).decode(errors="replace"))
            except OSError:
                return

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, seconds: float = 90) -> None:
        """Start the daemon and wait for READY=1. A start refused with exit 78 (the host id
        still a live member: a killed daemon's lease runs on) is tried again."""
        deadline = time.monotonic() + seconds
        while True:
            while not self.inbox.empty():
                self.inbox.get_nowait()
            self.starts += 1
            env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONPATH=str(REPO))
            env.pop("JOURNAL_STREAM", None)
            with self.lock, open(self.log, "ab") as log:
                if self.closed:
                    raise RigError(f"host {self.name} is closed")
                log.write(f"--- cluster_fire: start {self.starts} at {time.time():.6f}\n"
                          .encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [*self.link.prefix(), PYTHON, "-m", "hostvold", "--config",
                     str(self.config)], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
            if self._ready(deadline):
                return
            code = self.proc.wait()
            if code != 78 or time.monotonic() > deadline:
                raise RigError(f"host {self.name}: hostvold exited {code}: "
                               f"{self.log.read_text()[-2000:]}")
            time.sleep(1)

    def _ready(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(queue.Empty):
                if "READY=1" in self.inbox.get(timeout=0.2):
                    return True
        raise RigError(f"host {self.name}: hostvold not ready: {self.log.read_text()[-2000:]}")

    def pids(self) -> list[int]:
        """The whole host: every process of the daemon's session."""
        return session_pids(self.proc.pid) if self.proc is not None else []

    def kill(self) -> None:
        """SIGKILL every process of the host until none is left."""
        for _ in range(100):
            pids = self.pids()
            if not pids:
                break
            signal_pids(pids, signal.SIGKILL)
            time.sleep(0.05)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """A clean stop (SIGTERM, 25 s), then whatever is left of the host is killed."""
        signal_pids(self.pids(), signal.SIGCONT)
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(25)
        self.kill()

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.stop()
        self.bus.close()
        self.listener.close()


class Rig:
    """Everything the run starts, closed in reverse order whatever happens (Ctrl-C too)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="cluster-fire-", dir=args.dir))
        self.sockets = Path(tempfile.mkdtemp(prefix="hvfire-"))  # socket paths stay short
        self.closers: list[Callable[[], None]] = []
        self.hosts: list[Host] = []
        self.lease = args.lease
        tag = f"{os.getpid() % 100000}"
        net = 200 + os.getpid() % 50
        self.links = [Link(tag, name, index, net)
                      for index, name in enumerate(HOST_NAMES[:args.hosts])]
        self.image = self.work / "share.img"
        # the workload fills some 7 MiB a second, frozen volumes are never deleted: a full
        # share would leave the rest of a long run nothing but NoSpace (a 30-minute run on
        # 4 GiB was full after 9 minutes)
        self.image_bytes = max(4 << 30, int(args.minutes * 0.6 * (1 << 30)))
        self.mounts = self.work / "mnt"
        self.share = self.mounts / hashlib.md5(str(self.image).encode()).hexdigest()
        self.etcd = Etcd(self.work, [link.gateway for link in self.links])

    def build(self) -> None:
        with open(self.image, "wb") as image:
            image.truncate(self.image_bytes)
        sh("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0",
           str(self.image))
        self.share.mkdir(parents=True)
        # mounted once, here: a daemon under `ip netns exec` gets a copy of this mount
        # namespace, so every host sees the same share at the same path
        self.closers.append(self._umount)
        sh("mount", "-t", "ext4", "-o", "loop", str(self.image), str(self.share))
        for link in self.links:
            self.closers.append(link.close)
            link.create()
        self.closers.append(self.etcd.close)
        self.etcd.start()
        for link in self.links:
            host = Host(link.name, self.work / link.name, self.sockets / link.name, link,
                        self._config(link))
            self.closers.append(host.close)
            self.hosts.append(host)
        for host in self.hosts:
            host.start()
            say(f"host {host.name} ready (netns {host.link.ns}, etcd at {host.link.gateway})")

    def _config(self, link: Link) -> str:
        name = link.name
        home = self.work / name
        (self.work / f"{name}.shares").write_text(f"{self.image} -t ext4 -o loop\n")
        return (f"[daemon]\nstate_dir = {home / 'state'}\nbus = {{bus}}\n"
                f"[shares]\nshares_config = {self.work / f'{name}.shares'}\n"
                f"mount_point_base = {self.mounts}\n"
                "[libvirt]\nuri = test:///default\n"
                f"[coordination]\nbackend_url = etcd3+http://{link.gateway}:{self.etcd.port}\n"
                f"host_id = {name}\nlease_seconds = {self.lease}\nrescan_interval = 30\n")

    def _umount(self) -> None:
        for _ in range(10):
            if not self.share.is_mount():
                return
            if sh("umount", str(self.share), check=False).returncode != 0:
                time.sleep(0.5)
        sh("umount", "-l", str(self.share), check=False)

    def close(self, keep: list[Path]) -> Path | None:
        """Stop everything; keep the files named in ``keep`` (logs) in a directory of their
        own, returned, and remove the rest."""
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as exc:  # the rest must still be closed
                print(f"cluster_fire: cleanup: {exc}", file=sys.stderr)
        self.closers.clear()
        kept = None
        if keep:
            kept = Path(tempfile.mkdtemp(prefix="cluster-fire-logs-",
                                         dir=self.work.parent))
            for path in keep:
                if path.exists():
                    name = path.name if path.parent == self.work else \
                        f"{path.parent.name}-{path.name}"
                    shutil.copy(path, kept / name)
        if not self.share.is_mount():
            shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.sockets, ignore_errors=True)
        return kept


# ---- calls and the history ---------------------------------------------------------------

@dataclass
class Op:
    """One entry of the history: a hostvolctl call, or a patterned write of the bench."""

    index: int
    worker: int
    kind: str
    host: str
    volume: str
    target: str  # the snapshot or the new volume ("" when none)
    invoked: float
    completed: float = 0.0
    outcome: str = ""  # ok | failed | unknown
    error: str = ""  # the error's name (failed, unknown)
    detail: str = ""

    @property
    def refused(self) -> bool:
        """Failed in a way that says nothing was changed."""
        return self.outcome == "failed" and self.error in REFUSALS

    @property
    def undecided(self) -> bool:
        """May have taken effect, now or later (recovery finishes what a host recorded)."""
        return self.outcome != "ok" and not self.refused


class History:
    """Every operation, in invocation order; thread-safe."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.lock = threading.Lock()

    def begin(self, worker: int, kind: str, host: str, volume: str, target: str = "") -> Op:
        with self.lock:
            op = Op(len(self.ops), worker, kind, host, volume, target, time.time())
            self.ops.append(op)
            return op

    @staticmethod
    def end(op: Op, outcome: str, error: str = "", detail: str = "") -> Op:
        op.completed, op.outcome, op.error, op.detail = time.time(), outcome, error, detail
        return op


def error_name(stderr: str) -> str:
    """The error's name as hostvolctl prints it (``hostvolctl: Name: sentence``)."""
    line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    text = line.removeprefix("hostvolctl: ")
    if text.startswith("hostvold is not running"):
        return "NotRunning"  # nobody owned the name: the call reached no daemon
    if text.startswith("hostvold stopped while the job ran"):
        return "DaemonStopped"
    if text.startswith("cannot reach the D-Bus"):
        return "BusUnreachable"
    found = re.match(r"([A-Za-z][\w.]*): ", text)
    return found.group(1) if found else "Unrecognised"


def hostvolctl(address: str, *args: str, timeout: float = CALL_TIMEOUT) -> tuple[str, str, Any]:
    """One call: (outcome, error name or output, decoded JSON). A timeout, a daemon that
    left meanwhile, a bus-level error and an unrecognised failure are ``unknown``."""
    try:
        done = subprocess.run([PYTHON, "-m", "hostvold.client", "--bus", address, "--json",
                               *args], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        return "unknown", "Timeout", None
    if done.returncode == 0:
        try:
            return "ok", "", json.loads(done.stdout or "null")
        except ValueError:
            return "ok", "", None
    name = "UsageError" if done.returncode == 2 else error_name(done.stderr)
    definite = done.returncode in (1, 2, 3) and "." not in name and name not in (
        "DaemonStopped", "Unrecognised")
    return ("failed" if definite else "unknown"), name, done.stderr.strip()[-300:]


def read_info(share: Path, volume: str) -> dict[str, str]:
    """Cinder's chain map of a volume (active file, snapshot -> overlay), from the share."""
    path = share / f"volume-{volume}.info"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"active": f"volume-{volume}"}
    return {str(k): str(v) for k, v in data.items()}


def qemu_write(path: Path, fmt: str, regions: list[int], pattern: int) -> str:
    """Write ``pattern`` over ``regions``; '' when all went, else what qemu-io said."""
    commands = [arg for r in regions for arg in ("-c", f"write -P {pattern} {r * REGION} "
                                                       f"{REGION}")]
    done = subprocess.run(["qemu-io", "-f", fmt, *commands, str(path)], capture_output=True,
                          text=True, timeout=60)
    wrote = done.stdout.count("wrote ")
    if done.returncode != 0 or wrote != len(regions):
        return (done.stdout + done.stderr).strip()[-300:] or f"exit {done.returncode}"
    return ""


def qemu_mismatches(path: Path, fmt: str, content: Content) -> list[str]:
    """The regions of ``path`` (read through its backing chain) that do not hold
    ``content``, each with what it holds; [] when all do."""
    commands, expected = [], {}
    for index, pattern in enumerate(content):
        if pattern is not None:
            commands += ["-c", f"read -P {pattern} {index * REGION} {REGION}"]
            expected[index * REGION] = pattern
    if not commands:
        return []
    done = subprocess.run(["qemu-io", "-r", "-f", fmt, *commands, str(path)],
                          capture_output=True, text=True, timeout=120)
    good = {int(o) for o in re.findall(r"read \d+/\d+ bytes at offset (\d+)", done.stdout)}
    bad = {int(o) for o in re.findall(r"verification failed at offset (\d+)", done.stdout)}
    wrong = sorted((set(expected) - good) | bad)
    if wrong and not good and not bad:
        return [f"unreadable: {(done.stdout + done.stderr).strip()[-300:]}"]
    return [f"region {o // REGION} holds {peek(path, fmt, o)}, not 0x{expected[o]:02x}"
            for o in wrong]


def peek(path: Path, fmt: str, offset: int) -> str:
    """The distinct byte values of one region (for a violation's message)."""
    done = subprocess.run(["qemu-io", "-r", "-f", fmt, "-c", f"read -v {offset} {REGION}",
                           str(path)], capture_output=True, text=True, timeout=60)
    values = set()
    for line in done.stdout.splitlines():
        parts = line.split(":", 1)
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{8}", parts[0]):
            values.update(parts[1].split()[:16])
    return "bytes {" + ",".join(sorted(values)[:8]) + "}" if values else "nothing readable"


# ---- the model: what must exist, holding what --------------------------------------------

class Gate:
    """A volume's readers-writer lock in the bench. hostvold operations share it (hostvold
    orders them, and their effects on the model commute: none changes the active data); a
    patterned write, a revert or a delete holds it alone (their effects depend on order)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.shared, self.alone = 0, False

    @contextlib.contextmanager
    def hold(self, alone: bool, seconds: float = 20) -> Iterator[bool]:
        with self.cond:
            held = self.cond.wait_for(
                lambda: not self.alone and (not alone or self.shared == 0), seconds)
            if held:
                if alone:
                    self.alone = True
                else:
                    self.shared += 1
        try:
            yield held
        finally:
            if held:
                with self.cond:
                    if alone:
                        self.alone = False
                    else:
                        self.shared -= 1
                    self.cond.notify_all()


@dataclass
class Snap:
    content: Content
    sure: bool  # acknowledged: must exist (else it may or may not)


@dataclass
class Vol:
    """What the history allows of one volume. ``state``: exists, maybe (a create or a
    delete whose outcome is unknown), gone (deleted, or its create refused: must be absent).
    ``active``: the possible contents of its active data (two after an undecided revert).
    A volume with an undecided operation is frozen: no more work goes to it, so whenever
    that operation lands, the end state is one the checker can tell."""

    id: str
    owner: int
    fmt: str
    state: str
    active: list[Content]
    snaps: dict[str, Snap] = field(default_factory=dict)
    gone_snaps: set[str] = field(default_factory=set)
    frozen: str = ""
    gate: Gate = field(default_factory=Gate, repr=False)


class Model:
    """Every volume any call named, and what each may hold; its lock guards all of it."""

    def __init__(self) -> None:
        self.vols: dict[str, Vol] = {}
        self.lock = threading.Lock()

    def add(self, vid: str, owner: int, fmt: str, content: Content) -> Vol:
        with self.lock:
            vol = Vol(vid, owner, fmt, "pending", [content])
            self.vols[vid] = vol
            return vol

    def usable(self, vol: Vol) -> bool:
        return vol.state == "exists" and not vol.frozen and len(vol.active) == 1

    def pick(self, rng: random.Random, owner: int, mine: bool) -> Vol | None:
        with self.lock:
            found = [v for v in self.vols.values()
                     if self.usable(v) and (v.owner == owner) == mine]
        return rng.choice(found) if found else None

    def count(self, owner: int) -> int:
        with self.lock:
            return sum(1 for v in self.vols.values() if v.owner == owner and self.usable(v))

    @staticmethod
    def freeze(vol: Vol, why: str) -> None:
        if not vol.frozen:
            vol.frozen = why

    def settle_new(self, vol: Vol, op: Op) -> None:
        """A create, clone or volume from a snapshot ended: the new volume's state."""
        with self.lock:
            if op.outcome == "ok":
                vol.state = "exists"
            elif op.refused:
                vol.state = "gone"
            else:
                vol.state = "maybe"
                self.freeze(vol, f"{op.kind} #{op.index} {op.outcome} ({op.error})")


# ---- the clients -------------------------------------------------------------------------

class Worker(threading.Thread):
    """Random operations on random hosts. A worker owns the volumes it made and is the only
    one to write into them or revert or delete them; other workers make snapshots and
    copies of them and delete their snapshots, from other hosts, for lock contention."""

    def __init__(self, index: int, bench: Run) -> None:
        super().__init__(name=f"worker-{index}", daemon=True)
        self.index, self.bench = index, bench
        self.rng = random.Random(bench.seed * 1000 + index)
        self.errors = 0

    def run(self) -> None:
        while not self.bench.stopping.is_set():
            try:
                self.step()
            except Exception:  # a bench bug must not end the run silently
                self.errors += 1
                say(f"worker {self.index}: {traceback.format_exc().strip()}")
                time.sleep(1)

    def step(self) -> None:
        model, rng = self.bench.model, self.rng
        if model.count(self.index) < 2 or (model.count(self.index) < 5 and rng.random() < .1):
            self.create()
            return
        if rng.random() < 0.25 and (other := model.pick(rng, self.index, mine=False)):
            rng.choice([self.snapshot_create, self.snapshot_delete, self.clone,
                        self.snapshot_volume])(other)
            return
        vol = model.pick(rng, self.index, mine=True)
        if vol is None:
            return
        many = model.count(self.index) > 6  # copies add volumes: deletes keep the number
        action = rng.choices(
            [self.write, self.snapshot_create, self.snapshot_delete, self.revert, self.clone,
             self.snapshot_volume, self.delete], [30, 20, 12, 8, 5, 4, 20 if many else 4])[0]
        action(vol)

    def call(self, kind: str, volume: str, target: str, *args: str) -> Op:
        host = self.rng.choice(self.bench.rig.hosts)
        op = self.bench.history.begin(self.index, kind, host.name, volume, target)
        outcome, error, said = hostvolctl(host.bus.address, *args)
        if outcome == "ok":
            return History.end(op, outcome)
        History.end(op, outcome, error, str(said))
        if error in ("Failed", "Unrecognised", "UsageError"):  # bugs (hostvold's, or ours)
            self.bench.anomalies.append(f"{kind} #{op.index} on host {host.name} "
                                        f"{outcome}: {said}")
        time.sleep(self.rng.uniform(0.1, 0.5))  # a host that refuses everything is not hammered
        return op

    # ---- operations that make a volume

    def create(self) -> None:
        vid, fmt = str(uuid.uuid4()), self.rng.choice(["raw", "qcow2"])
        vol = self.bench.model.add(vid, self.index, fmt, (0,) * REGIONS)
        op = self.call("create", vid, "", "create", f"{VOLUME_MIB}M", "--format", fmt,
                       "--id", vid)
        self.bench.model.settle_new(vol, op)

    def clone(self, src: Vol) -> None:
        self._copy(src, "clone", None)

    def snapshot_volume(self, src: Vol) -> None:
        self._copy(src, "snapshot-volume", self._sure_snapshot(src))

    def _copy(self, src: Vol, kind: str, sid: str | None) -> None:
        """A clone (``sid`` None) or a volume from snapshot ``sid``: a new volume of ours."""
        model = self.bench.model
        with src.gate.hold(alone=False) as held:
            if not held or (kind == "snapshot-volume" and sid is None):
                return
            with model.lock:
                if not model.usable(src) or (sid is not None and sid not in src.snaps):
                    return
                content = src.snaps[sid].content if sid else src.active[0]
            vid, fmt = str(uuid.uuid4()), self.rng.choice(["raw", "qcow2"])
            vol = model.add(vid, self.index, fmt, content)
            args = (["snapshot", "create-volume", sid] if sid else ["clone", src.id])
            op = self.call(kind, src.id, vid, *args, "--id", vid, "--format", fmt)
            model.settle_new(vol, op)
            if op.undecided:  # it may still read the source later: the source stays as is
                with model.lock:
                    model.freeze(src, f"{kind} #{op.index} {op.outcome} ({op.error})")

    # ---- operations on a volume's snapshots (shared)

    def _sure_snapshot(self, vol: Vol) -> str | None:
        with self.bench.model.lock:
            sure = sorted(s for s, snap in vol.snaps.items() if snap.sure)
        return self.rng.choice(sure) if sure else None

    def snapshot_create(self, vol: Vol) -> None:
        model = self.bench.model
        with vol.gate.hold(alone=False) as held:
            with model.lock:
                if not held or not model.usable(vol):
                    return
                content = vol.active[0]
            sid = str(uuid.uuid4())
            op = self.call("snapshot-create", vol.id, sid, "snapshot", "create", vol.id,
                           "--id", sid)
            with model.lock:
                if op.outcome == "ok":
                    vol.snaps[sid] = Snap(content, True)
                elif op.refused:
                    vol.gone_snaps.add(sid)
                else:
                    vol.snaps[sid] = Snap(content, False)
                    model.freeze(vol, f"snapshot-create #{op.index} {op.outcome} ({op.error})")

    def snapshot_delete(self, vol: Vol) -> None:
        model = self.bench.model
        with vol.gate.hold(alone=False) as held:
            sid = self._sure_snapshot(vol)
            with model.lock:
                if not held or not model.usable(vol) or sid is None:
                    return
            op = self.call("snapshot-delete", vol.id, sid, "snapshot", "delete", sid)
            with model.lock:
                if op.outcome == "ok":
                    vol.snaps.pop(sid, None)
                    vol.gone_snaps.add(sid)
                elif op.undecided:
                    if sid in vol.snaps:
                        vol.snaps[sid].sure = False
                    model.freeze(vol, f"snapshot-delete #{op.index} {op.outcome} ({op.error})")

    # ---- operations whose effect depends on order (alone)

    def write(self, vol: Vol) -> None:
        model, rng, share = self.bench.model, self.rng, self.bench.rig.share
        with vol.gate.hold(alone=True) as held:
            with model.lock:
                if not held or not model.usable(vol):
                    return
            active = read_info(share, vol.id)["active"]
            fmt = vol.fmt if active == f"volume-{vol.id}" else "qcow2"
            regions = sorted(rng.sample(range(REGIONS), rng.randint(1, 3)))
            pattern = rng.randint(1, 255)
            op = self.bench.history.begin(self.index, "write", "-", vol.id, active)
            failed = qemu_write(share / active, fmt, regions, pattern)
            History.end(op, "unknown" if failed else "ok", "WriteFailed" if failed else "",
                        failed or f"0x{pattern:02x} at regions {regions}")
            with model.lock:
                content = list(vol.active[0])
                for region in regions:
                    content[region] = None if failed else pattern
                vol.active = [tuple(content)]
                if failed:
                    self.bench.anomalies.append(f"write #{op.index} into {active} failed: "
                                               f"{failed}")
                    model.freeze(vol, f"write #{op.index} failed")

    def revert(self, vol: Vol) -> None:
        model, share = self.bench.model, self.bench.rig.share
        with vol.gate.hold(alone=True) as held:
            with model.lock:
                if not held or not model.usable(vol):
                    return
            info = read_info(share, vol.id)
            # the newest snapshot is the one whose overlay is the active file
            newest = [s for s, f in info.items() if s != "active" and f == info["active"]]
            with model.lock:
                if not newest or newest[0] not in vol.snaps:
                    return
                target = vol.snaps[newest[0]].content
            op = self.call("revert", vol.id, newest[0], "revert", vol.id, newest[0])
            with model.lock:
                if op.outcome == "ok":
                    vol.active = [target]
                elif op.undecided:
                    vol.active = [vol.active[0], target]
                    model.freeze(vol, f"revert #{op.index} {op.outcome} ({op.error})")

    def delete(self, vol: Vol) -> None:
        model = self.bench.model
        with vol.gate.hold(alone=True) as held:
            with model.lock:
                if not held or not model.usable(vol):
                    return
            op = self.call("delete", vol.id, "", "delete", vol.id)
            with model.lock:
                if op.outcome == "ok":
                    vol.state = "gone"
                elif op.undecided:
                    vol.state = "maybe"
                    model.freeze(vol, f"delete #{op.index} {op.outcome} ({op.error})")


# ---- the nemesis -------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    host: str  # "etcd" for an etcd restart
    started: float
    healed: float = 0.0
    note: str = ""
    stopped: float = 0.0  # a pause: when the SIGSTOP went out, and the SIGCONT
    resumed: float = 0.0


class Nemesis(threading.Thread):
    """Faults at random moments, one at a time or two at once on different hosts; each is
    healed after a while. An etcd restart comes alone."""

    def __init__(self, bench: Run, kinds: list[str]) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.bench, self.kinds = bench, kinds
        self.rng = random.Random(bench.seed * 1000 + 999)
        self.lease = bench.rig.lease
        self.busy: set[str] = set()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def run(self) -> None:
        rng, hosts = self.rng, self.bench.rig.hosts
        while self.kinds and not self.bench.stopping.wait(rng.uniform(2, 6)):
            with self.lock:
                busy = set(self.busy)
            if "etcd" in busy or len(busy) >= (2 if rng.random() < 0.3 else 1):
                continue
            kind = rng.choice(self.kinds)
            free = [h for h in hosts if h.name not in busy]
            if (kind == "etcd" and busy) or not free:
                continue
            target = "etcd" if kind == "etcd" else rng.choice(free).name
            with self.lock:
                self.busy.add(target)
            thread = threading.Thread(target=self.fault, args=(kind, target), daemon=True)
            self.threads.append(thread)
            thread.start()
        for thread in self.threads:
            thread.join()

    def fault(self, kind: str, target: str) -> None:
        record = Fault(kind, target, time.time())
        self.bench.faults.append(record)
        host = next((h for h in self.bench.rig.hosts if h.name == target), None)
        try:
            record.note = getattr(self, kind.replace("-", "_"))(host, record)
            say(f"fault {kind} {target}: {record.note}")
        except Exception as exc:
            record.note = f"not healed: {exc}"
            self.bench.anomalies.append(f"fault {kind} of {target}: {exc}")
            say(f"fault {kind} {target}: {record.note[:300]}")
        finally:
            record.healed = time.time()
            with self.lock:
                self.busy.discard(target)

    def _aim(self, host: Host) -> str:
        """Half the time, wait (up to 5 s) for the host to run a qemu-img: a fault in the
        middle of a data-changing step is the case that matters."""
        if self.rng.random() < 0.5:
            return ""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for pid in host.pids():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                    if argv[0].endswith("qemu-img") and len(argv) > 1:
                        return f" (aimed: during qemu-img {argv[1]})"
            time.sleep(0.02)
        return ""

    def _pause(self) -> float:
        """Longer than the lease: the host's locks and operations may be taken over."""
        return self.rng.uniform(self.lease + 2, self.lease + 6)

    def kill(self, host: Host, _record: Fault) -> str:
        aimed = self._aim(host)
        pids = host.pids()
        host.kill()
        self.bench.kills.setdefault(host.name, []).append(time.time())
        started = time.monotonic()
        host.start()
        return (f"SIGKILL to {len(pids)} processes{aimed}; back in "
                f"{time.monotonic() - started:.1f} s")

    def pause_host(self, host: Host, record: Fault) -> str:
        aimed = self._aim(host)
        pids: set[int] = set()
        for _ in range(3):  # a process forked meanwhile is stopped by the next round
            found = set(host.pids()) - pids
            signal_pids(sorted(found), signal.SIGSTOP)
            record.stopped = record.stopped or time.time()  # what ran until now did run
            pids |= found
        seconds = self._pause()
        time.sleep(seconds)
        awake = sorted(set(host.pids()) | pids)
        self.rng.shuffle(awake)  # whichever wakes first runs first, as after a real stall
        signal_pids(awake, signal.SIGCONT)
        record.resumed = time.time()
        return (f"SIGSTOP of {len(pids)} processes{aimed} for {seconds:.1f} s"
                f"{self._restart_if_fenced(host)}")

    def pause_daemon(self, host: Host, record: Fault) -> str:
        assert host.proc is not None
        aimed, seconds = self._aim(host), self._pause()
        signal_pids([host.proc.pid], signal.SIGSTOP)
        record.stopped = time.time()
        time.sleep(seconds)
        signal_pids([host.proc.pid], signal.SIGCONT)
        record.resumed = time.time()
        return (f"SIGSTOP of the daemon (pid {host.proc.pid}){aimed} for {seconds:.1f} s"
                f"{self._restart_if_fenced(host)}")

    def _restart_if_fenced(self, host: Host) -> str:
        """A daemon stopped for most of its lease is killed by its own fence guard; it is
        started again, as systemd's Restart=on-failure would."""
        assert host.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.proc.wait(1)
        if host.proc.poll() is None:
            return ""
        host.kill()  # whatever of the host is left
        self.bench.kills.setdefault(host.name, []).append(time.time())
        host.start()
        return "; killed by its fence guard, started again"

    def cut(self, host: Host, _record: Fault) -> str:
        aimed, seconds = self._aim(host), self.rng.uniform(1, 2 * self.lease)
        host.link.cut()
        try:
            time.sleep(seconds)
        finally:
            host.link.heal()
        return f"link to etcd down{aimed} for {seconds:.1f} s"

    def etcd(self, _host: Host | None, _record: Fault) -> str:
        seconds = self.rng.uniform(2, 5)
        self.bench.rig.etcd.stop()
        time.sleep(seconds)
        self.bench.rig.etcd.start()
        return f"etcd down for {seconds:.1f} s"


# ---- the checker -------------------------------------------------------------------------

def object_id(path: str) -> str:
    return path.rsplit("/", 1)[1].replace("_", "-")


def settle(bench: Run, seconds: float) -> list[str]:
    """Wait until every host is up and a member, runs no job, and no volume on the share
    records an operation or a passing state; what is still not so after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = []
        for host in bench.rig.hosts:
            if not host.alive:
                bench.anomalies.append(f"host {host.name} was down at the end (exit "
                                       f"{host.proc.poll() if host.proc else '-'}): restarted")
                with contextlib.suppress(RigError):
                    host.start()
                left.append(f"host {host.name} was down")
                continue
            outcome, error, status = hostvolctl(host.bus.address, "status", timeout=20)
            if outcome != "ok":
                left.append(f"host {host.name}: status {outcome}: {error}")
            elif "member" not in str(status.get("coordination")):
                left.append(f"host {host.name}: coordination {status.get('coordination')}")
            elif status.get("jobs-running"):
                left.append(f"host {host.name}: {status['jobs-running']} jobs running")
        for meta in sorted(bench.rig.share.glob("volume-*.meta")):
            try:
                record = json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                left.append(f"{meta.name}: unreadable ({exc})")
                continue
            if record.get("operation") or record.get("state") in ("creating", "deleting"):
                left.append(f"{meta.name}: state {record.get('state')}, operation "
                            f"{record.get('operation')}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


View = dict[str, tuple[Any, ...]]


def host_view(host: Host) -> View | str:
    """A host's volumes: id -> (active file, state, format, size, snapshot ids, problems),
    checked against its own snapshot listing; or why it could not be read."""
    outcome, error, volumes = hostvolctl(host.bus.address, "volumes", timeout=30)
    outcome2, error2, snapshots = hostvolctl(host.bus.address, "snapshots", timeout=30)
    if outcome != "ok" or outcome2 != "ok":
        return f"host {host.name}: listing failed: {error or error2}"
    view = {v["Id"]: (v["ActiveFile"], v["State"], v["Format"], v["Size"],
                      tuple(sorted(object_id(p) for p in v["Snapshots"])), tuple(v["Problems"]))
            for v in volumes}
    listed: dict[str, list[str]] = {}
    for snap in snapshots:
        listed.setdefault(object_id(snap["Volume"]), []).append(snap["Id"])
    for vid, entry in view.items():
        if tuple(sorted(listed.pop(vid, []))) != entry[4]:
            return f"host {host.name}: `snapshots` and `volumes` disagree on volume {vid}"
    if listed:
        return f"host {host.name}: snapshots of unlisted volumes: {sorted(listed)}"
    return view


def agreed_view(bench: Run, seconds: float) -> tuple[str, View | None, list[str]]:
    """The hosts' common view, once they agree (they may lag each other for a moment).
    When they do not: the differences, and the view of the host closest to the share (the
    truth), so that the rest of the check still runs."""
    deadline = time.monotonic() + seconds
    while True:
        views = {h.name: host_view(h) for h in bench.rig.hosts}
        broken = [v for v in views.values() if isinstance(v, str)]
        good = {n: v for n, v in views.items() if not isinstance(v, str)}
        first = next(iter(good.values()), None)
        if not broken and first is not None and all(v == first for v in good.values()):
            waited = seconds - (deadline - time.monotonic())
            say(f"the hosts agree on {len(first)} volumes (after {waited:.1f} s)")
            return "all hosts", first, []
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    if not good:
        return "", None, broken
    name = min(good, key=lambda n: distance_to_share(bench.rig.share, good[n]))
    return (f"host {name} (closest to the share)", good[name],
            broken + differences(good, bench.rig.share))


def distance_to_share(share: Path, view: View) -> int:
    """How many volumes a view shows otherwise than the share's own files say."""
    on_share = {p.name[len("volume-"):-len(".meta")] for p in share.glob("volume-*.meta")
                if p.with_suffix("").exists()}
    wrong = len(on_share ^ set(view))
    for vid, entry in view.items():
        info = read_info(share, vid)
        wrong += info["active"] != entry[0] or set(entry[4]) != set(info) - {"active"}
    return wrong


def differences(views: dict[str, View], share: Path) -> list[str]:
    """One line per volume the hosts show differently, with what the share holds."""
    found = []
    names = sorted(views)
    for vid in sorted(set().union(*views.values())):
        seen = {n: views[n].get(vid) for n in names}
        if len({str(v) for v in seen.values()}) > 1:
            meta = share / f"volume-{vid}.meta"
            truth = (f"active {read_info(share, vid)['active']}, snapshots "
                     f"{sorted(set(read_info(share, vid)) - {'active'})}"
                     if meta.exists() else "no .meta")
            found.append(f"hosts disagree on volume {vid}: " + "; ".join(
                f"{n}: {v if v is not None else 'absent'}" for n, v in seen.items())
                + f"; the share: {truth}")
    return found


def backing_of(overlay: Path) -> tuple[Path, str]:
    """The file (and format) an overlay names as its backing file: a snapshot's data."""
    done = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(overlay)],
                          capture_output=True, text=True, timeout=60, check=True)
    info = json.loads(done.stdout)
    return overlay.parent / info["backing-filename"], info.get("backing-filename-format", "raw")


class Checker:
    """What the hosts and the share show at the end, against what the history allows."""

    def __init__(self, bench: Run, view: View) -> None:
        self.bench, self.view, self.share = bench, view, bench.rig.share
        self.violations: list[str] = []
        self.stats: Counter[str] = Counter()
        self.files: dict[str, set[str]] = {}
        for path in self.share.iterdir():
            found = re.match(r"volume-([0-9a-f-]{36})", path.name)
            if found:
                self.files.setdefault(found.group(1), set()).add(path.name)

    def bad(self, vol: Vol | None, text: str) -> None:
        why = f" [{vol.state}{', frozen: ' + vol.frozen if vol and vol.frozen else ''}]" \
            if vol else ""
        self.violations.append(text + why)

    def run(self) -> list[str]:
        for vid, vol in sorted(self.bench.model.vols.items()):
            self.stats["volumes in the model"] += 1
            present = vid in self.view
            if vol.state == "exists" and not present:
                self.bad(vol, f"volume {vid}: acknowledged, not deleted, but missing")
            elif vol.state == "gone" and present:
                self.bad(vol, f"volume {vid}: deleted or refused, but present")
            elif present:
                self.volume(vol, self.view[vid])
            elif self.files.get(vid):
                self.bad(vol, f"volume {vid}: absent, but files are left: "
                              f"{sorted(self.files[vid])}")
        for vid in sorted(set(self.view) - set(self.bench.model.vols)):
            self.bad(None, f"volume {vid}: present, but no call ever named it")
        return self.violations

    def volume(self, vol: Vol, entry: tuple[Any, ...]) -> None:
        active, state, fmt, _size, snaps, problems = entry
        self.stats["volumes present"] += 1
        base = f"volume-{vol.id}"
        if problems or state != "available" or fmt != vol.fmt:
            self.bad(vol, f"volume {vol.id}: state {state}, format {fmt} (made {vol.fmt}), "
                          f"problems {list(problems)}")
        info = read_info(self.share, vol.id)
        if info["active"] != active:
            self.bad(vol, f"volume {vol.id}: hosts say active file {active}, the info file "
                          f"{info['active']}")
        observed = set(snaps)
        if observed != set(info) - {"active"}:
            self.bad(vol, f"volume {vol.id}: hosts list snapshots {sorted(observed)}, the "
                          f"info file {sorted(set(info) - {'active'})}")
        for sid, snap in vol.snaps.items():
            if snap.sure and sid not in observed:
                self.bad(vol, f"volume {vol.id}: acknowledged snapshot {sid} missing")
        for sid in sorted(observed & vol.gone_snaps):
            self.bad(vol, f"volume {vol.id}: snapshot {sid} deleted or refused, but present")
        for sid in sorted(observed - set(vol.snaps) - vol.gone_snaps):
            self.bad(vol, f"volume {vol.id}: snapshot {sid} present, but never made")
        expected = {base, f"{base}.info", f"{base}.meta", *info.values()}
        stray = self.files.get(vol.id, set()) - expected
        if stray:
            self.bad(vol, f"volume {vol.id}: stray files {sorted(stray)}")
        self.data(vol, active, sorted(observed & set(vol.snaps)), info)

    def data(self, vol: Vol, active: str, sids: list[str], info: dict[str, str]) -> None:
        """Every point in time reads back whole: the active data as one of the contents
        the history allows, each snapshot as the data written before it was taken."""
        fmt = vol.fmt if active == f"volume-{vol.id}" else "qcow2"
        results = [qemu_mismatches(self.share / active, fmt, c) for c in vol.active]
        self.stats["points in time read"] += 1
        if all(results):
            self.bad(vol, f"volume {vol.id}: active data ({active}, {fmt}) is not what the "
                          f"history allows: {'; '.join(results[0][:4])}")
        for sid in sids:
            self.stats["points in time read"] += 1
            try:
                path, pit_fmt = backing_of(self.share / info[sid])
            except (subprocess.CalledProcessError, KeyError, ValueError) as exc:
                self.bad(vol, f"volume {vol.id}: snapshot {sid}: no backing file ({exc})")
                continue
            wrong = qemu_mismatches(path, pit_fmt, vol.snaps[sid].content)
            if wrong:
                self.bad(vol, f"volume {vol.id}: snapshot {sid} ({path.name}, {pit_fmt}) "
                              f"lost its data: {'; '.join(wrong[:4])}")


def stale_refusals(bench: Run) -> list[str]:
    """Calls answered NotFound for a volume or snapshot whose creation was acknowledged
    before the call, with no delete of it that could have landed: a host answering from
    a stale picture (not a safety violation; the SPEC wants changes seen within a second)."""
    made: dict[str, float] = {}
    deleting: dict[str, list[Op]] = {}
    for op in bench.history.ops:
        if op.outcome == "ok" and op.kind in ("create", "clone", "snapshot-volume",
                                              "snapshot-create"):
            made[op.target or op.volume] = op.completed
        if op.kind in ("delete", "snapshot-delete") and not op.refused:
            deleting.setdefault(op.target or op.volume, []).append(op)
    found = []
    for op in bench.history.ops:
        if op.error != "NotFound":
            continue
        subject = op.target if op.kind in ("snapshot-delete", "snapshot-volume") else op.volume
        volume_gone = [d for d in deleting.get(op.volume, []) if d.invoked < op.completed]
        gone = [d for d in deleting.get(subject, []) if d.invoked < op.completed]
        if subject in made and made[subject] < op.invoked and not gone and not volume_gone:
            faults = [f"{f.kind} {f.host}" for f in bench.faults
                      if f.started < op.completed and (f.healed or 1e18) > op.invoked - 30]
            found.append(f"{op.kind} #{op.index} on host {op.host}: NotFound for {subject}, "
                         f"acknowledged {op.invoked - made[subject]:.1f} s before the call "
                         f"(faults around then: {', '.join(faults) or 'none'})")
    return found


# ---- STEP lines: no two hosts change one volume at once -----------------------------------

STEP = re.compile(r"STEP (begin|end|record|killed) (.*)$")
START = re.compile(r"^--- cluster_fire: start \d+ at ([\d.]+)")


@dataclass
class Step:
    """A data-changing step of one host on one volume: a writing qemu-img child from its
    start to its reaping or its kill, or a metadata record (an instant)."""

    host: str
    volume: str
    begin: float
    end: float
    what: str
    lines: list[str]


def read_steps(path: Path, host: str, kills: list[float], run_end: float,
               counts: Counter[str]) -> list[Step]:
    """One host's steps from its log. A child with no end in the log died with its host:
    its step ends at the SIGKILL of that host (or at the daemon's next start, or at the
    end of the run when neither came)."""
    events: list[tuple[float, str, dict[str, str], str]] = []
    for line in path.read_text(errors="replace").splitlines():
        if (started := START.match(line)) is not None:
            events.append((float(started.group(1)), "start", {}, line))
        elif (found := STEP.search(line)) is not None:
            fields = dict(kv.split("=", 1) for kv in found.group(2).split() if "=" in kv)
            with contextlib.suppress(KeyError, ValueError):
                events.append((float(fields["t"]), found.group(1), fields, line.strip()))
    steps, running = [], {}
    for t, kind, fields, line in sorted(events, key=lambda e: e[0]):
        counts[kind] += 1
        if kind == "record":
            steps.append(Step(fields.get("host", host), fields.get("volume", "?"), t, t,
                              f"record {fields.get('op')}/{fields.get('step')}", [line]))
        elif kind == "begin":
            running[fields.get("pid", "?")] = Step(
                fields.get("host", host), fields.get("volume", "?"), t, t,
                f"qemu-img {fields.get('what')} pid {fields.get('pid')}", [line])
        elif kind in ("end", "killed") and (step := running.pop(fields.get("pid", "?"),
                                                                None)) is not None:
            step.end = t
            step.lines.append(line)
            steps.append(step)
        elif kind == "start":
            steps += close_running(running, kills, t)
    return steps + close_running(running, kills, run_end)


def close_running(running: dict[str, Step], kills: list[float], limit: float) -> list[Step]:
    closed = []
    for step in running.values():
        after = [k for k in kills if step.begin <= k <= limit]
        step.end = min(after) if after else limit
        why = "the SIGKILL of its host" if after else "its next start or the end of the run"
        step.lines.append(f"(no end logged: ends at {step.end:.6f}, {why})")
        closed.append(step)
    running.clear()
    return closed


def late_records(steps: list[Step], faults: list[Fault]) -> list[str]:
    """Metadata records a host logged just before it was stopped: the write itself may
    have landed after the SIGCONT (the log line comes first), so a step of another host
    on that volume during the pause is suspect (listed, not counted: the log cannot tell)."""
    found = []
    for fault in faults:
        if not fault.stopped:
            continue
        late = [s for s in steps if s.host == fault.host and s.what.startswith("record")
                and fault.stopped - 0.3 <= s.begin <= fault.stopped]
        for record in late:
            others = [s for s in steps if s.volume == record.volume and s.host != record.host
                      and s.begin < fault.resumed + 1 and s.end > fault.stopped]
            if others:
                found.append(f"volume {record.volume}: host {record.host} logged a record "
                             f"{fault.stopped - record.begin:.3f} s before its SIGSTOP "
                             f"({fault.kind}, {fault.resumed - fault.stopped:.1f} s); host "
                             f"{others[0].host} ran {others[0].what} at {others[0].begin:.6f}")
    return found


def awake_parts(steps: list[Step], faults: list[Fault]) -> list[Step]:
    """Each step with the windows cut out in which every process of its host was stopped
    (a pause of the whole host): a stopped process changes nothing, whatever the clock on
    the wall says. A child the stopped daemon had not yet reaped (it may have ended long
    before) would otherwise seem to run through the whole pause."""
    frozen: dict[str, list[tuple[float, float]]] = {}
    for fault in faults:
        if fault.kind == "pause-host" and fault.stopped and fault.resumed:
            frozen.setdefault(fault.host, []).append((fault.stopped, fault.resumed))
    parts = []
    for step in steps:
        pieces = [(step.begin, step.end)]
        for start, stop in sorted(frozen.get(step.host, [])):
            cut = []
            for begin, end in pieces:
                if end <= start or begin >= stop or begin == end:
                    cut.append((begin, end))
                    continue
                if begin < start:
                    cut.append((begin, start))
                if end > stop:
                    cut.append((stop, end))
            pieces = cut
        parts += [Step(step.host, step.volume, begin, end, step.what, step.lines)
                  for begin, end in pieces]
    return parts


def overlaps(steps: list[Step]) -> list[str]:
    """Every pair of steps of different hosts on one volume whose times overlap."""
    found = []
    by_volume: dict[str, list[Step]] = {}
    for step in steps:
        by_volume.setdefault(step.volume, []).append(step)
    for vid, items in sorted(by_volume.items()):
        items.sort(key=lambda s: s.begin)
        for index, first in enumerate(items):
            for second in items[index + 1:]:
                if second.begin >= first.end:
                    break
                if second.host != first.host and first.begin < second.end:
                    found.append(
                        f"volume {vid}: host {first.host} {first.what} "
                        f"[{first.begin:.6f}, {first.end:.6f}] overlaps host {second.host} "
                        f"{second.what} [{second.begin:.6f}, {second.end:.6f}]\n      "
                        + "\n      ".join(first.lines + second.lines))
    return found


# ---- the run -----------------------------------------------------------------------------

class Run:
    """One run: the rig, the history, the model and the faults."""

    def __init__(self, args: argparse.Namespace, rig: Rig) -> None:
        self.rig, self.seed = rig, args.seed
        self.model, self.history = Model(), History()
        self.stopping = threading.Event()
        self.anomalies: list[str] = []
        self.faults: list[Fault] = []
        self.kills: dict[str, list[float]] = {}


@dataclass
class Report:
    operations: int
    faults: int
    violations: list[str]
    keep: list[Path]


def exercise(bench: Run, args: argparse.Namespace) -> Report:
    """Workload and nemesis for the run's length; then heal, settle and check."""
    workers = [Worker(index, bench) for index in range(args.workers)]
    nemesis = Nemesis(bench, args.faults)
    for thread in [*workers, nemesis]:
        thread.start()
    end = time.monotonic() + args.minutes * 60
    try:
        while time.monotonic() < end:
            time.sleep(min(10.0, max(end - time.monotonic(), 0.0)))
            frozen = sum(1 for v in bench.model.vols.values() if v.frozen)
            say(f"{len(bench.history.ops)} operations, {len(bench.faults)} faults, "
                f"{len(bench.model.vols)} volumes ({frozen} frozen)")
    finally:  # interrupted too: no new fault, and the running ones healed before the close
        bench.stopping.set()
        nemesis.join(120)
    for worker in workers:
        worker.join(CALL_TIMEOUT + 30)
    say("workload stopped, every fault healed; settling")
    run_end = time.time()
    started = time.monotonic()
    violations: list[str] = []
    unsettled = settle(bench, args.settle)
    settled_in = time.monotonic() - started
    violations += [f"not settled after {args.settle:.0f} s: {line}" for line in unsettled]
    viewer, view, disagreements = agreed_view(bench, args.agree)
    violations += disagreements
    checker = Checker(bench, view) if view is not None else None
    bench.anomalies += stale_refusals(bench)
    if checker is not None:
        violations += checker.run()
    counts: Counter[str] = Counter()
    steps = [step for host in bench.rig.hosts for step in read_steps(
        host.log, host.name, bench.kills.get(host.name, []), run_end, counts)]
    overlapping = overlaps(awake_parts(steps, bench.faults))
    violations += overlapping
    bench.anomalies += late_records(steps, bench.faults)
    history = bench.rig.work / "history.json"
    history.write_text(json.dumps({"ops": [asdict(op) for op in bench.history.ops],
                                   "faults": [asdict(f) for f in bench.faults],
                                   "anomalies": bench.anomalies}, indent=1))
    print_tables(bench, checker, viewer, counts, len(steps), overlapping, settled_in,
                 unsettled)
    print_list("anomalies (not counted as violations)", bench.anomalies, most=12)
    print_list("violations", violations)
    errors = sum(w.errors for w in workers)
    if errors:
        bench.anomalies.append(f"{errors} bench errors in the workers (tracebacks above)")
    keep = [history, bench.rig.work / "etcd.log", *(h.log for h in bench.rig.hosts)]
    return Report(len(bench.history.ops), len(bench.faults), violations, keep)


def print_tables(bench: Run, checker: Checker | None, viewer: str, counts: Counter[str],
                 steps: int, overlapping: list[str], settled_in: float,
                 unsettled: list[str]) -> None:
    outcomes: dict[str, Counter[str]] = {}
    names: Counter[str] = Counter()
    for op in bench.history.ops:
        outcomes.setdefault(op.kind, Counter())[op.outcome or "running"] += 1
        if op.error:
            names[f"{op.kind} {op.outcome} {op.error}"] += 1
    print("\noperations by kind and outcome:")
    print(f"  {'kind':<18}{'ok':>6}{'failed':>8}{'unknown':>9}")
    for kind, counted in sorted(outcomes.items()):
        print(f"  {kind:<18}{counted['ok']:>6}{counted['failed']:>8}{counted['unknown']:>9}")
    print("  errors: " + (", ".join(f"{n} x{c}" for n, c in names.most_common()) or "none"))
    kinds = Counter(f.kind for f in bench.faults)
    print("faults by kind: " + (", ".join(f"{k} {kinds[k]}" for k in FAULT_KINDS) or "none"))
    frozen = sum(1 for v in bench.model.vols.values() if v.frozen)
    print("checker:")
    print(f"  settled                {'yes' if not unsettled else 'NO'} ({settled_in:.1f} s)")
    print(f"  hosts agree            {'yes' if viewer == 'all hosts' else 'NO'}; checked "
          f"against the view of {viewer or 'no host'}")
    if checker is not None:
        for key, value in sorted(checker.stats.items()):
            print(f"  {key:<22} {value}")
    print(f"  frozen volumes         {frozen} (an operation's outcome unknown: left alone)")
    print("  STEP lines             " + ", ".join(f"{k} {counts[k]}" for k in (
        "begin", "end", "record", "killed")) + f"; {steps} steps")
    print(f"  overlapping steps      {len(overlapping)}")


def print_list(title: str, items: list[str], most: int = 0) -> None:
    if items:
        print(f"{title}: {len(items)}")
        for item in items[:most or len(items)]:
            print(f"  - {item}")
        if len(items) > (most or len(items)):
            print(f"  ... and {len(items) - most} more (all in the history file)")


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--hosts", type=int, default=3, choices=range(2, len(HOST_NAMES) + 1))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--lease", type=int, default=6, help="lease_seconds of every host")
    parser.add_argument("--dir", type=Path, default=None, help="where the share image goes")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds the hosts get at the end to finish every operation")
    parser.add_argument("--agree", type=float, default=15.0,
                        help="seconds the settled hosts get to show the same volumes")
    parser.add_argument("--keep", action="store_true",
                        help="keep the logs and the history even when all went well")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help="fault kinds, comma-separated ('' for none)")
    args = parser.parse_args(argv)
    args.faults = [k for k in args.faults.split(",") if k]
    unknown = set(args.faults) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("cluster_fire: needs root (network namespaces, loop mounts)", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT may come ignored
        signal.signal(signum, _interrupted)
    say(f"seed {args.seed}, {args.hosts} hosts, lease {args.lease} s, {args.minutes} min, "
        f"faults {','.join(args.faults) or 'none'}")
    rig = Rig(args)
    report: Report | None = None
    try:
        rig.build()
        report = exercise(Run(args, rig), args)
    except RigError as exc:
        print(f"cluster_fire: the rig failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("cluster_fire: interrupted; cleaning up", file=sys.stderr)
    finally:
        wanted = report is not None and (bool(report.violations) or args.keep)
        kept = rig.close(report.keep if report is not None and wanted else [])
    if report is None:
        return 2
    if kept is not None:
        print(f"logs and history kept in {kept}")
    print(f"cluster_fire: {report.operations} operations, {report.faults} faults, "
          f"{len(report.violations)} violations")
    return 0 if not report.violations else 1


if __name__ == "__main__":
    sys.exit(main())
