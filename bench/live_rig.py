"""The set-up ``bench/live_latency.py`` (P1, P2) needs, built and removed around one run of it.

    python -m bench.live_rig [--rounds 5]

As root: starts ``virtlogd`` + ``libvirtd`` when ``qemu:///system`` does not answer (left
running afterwards: other users of this host may have connected since), makes a mount base
that is a shared mount (libvirt starts QEMU in a mount namespace of its own; only mounts
under a shared mount reach it), a 64 MiB diskless TCG domain with a virtio-scsi controller,
a private dbus-daemon, a hostvold on a loop-mounted ext4 share under that base
(``quiesce = never``: the domain runs no guest agent), and an 8 MiB volume attached to the
domain. Then runs ``bench.live_latency`` against them and passes its output through (its
last lines are the P1 and P2 summaries). Everything it made is removed at the end.

Exit status 77 with one line on stderr when this host cannot run it (not root, a program
missing, libvirtd not answering, no domain can start): ``bench/run_all.py`` shows it as a
skipped row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
URI = "qemu:///system"
CANNOT_RUN = 77
PROGRAMS = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "dbus-daemon",
            "mkfs.ext4", "mount")
DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
  <controller type='scsi' index='0' model='virtio-scsi'/></devices>
</domain>"""


class CannotRun(Exception):
    """This host lacks something the benchmark needs (not a failure of hostvold)."""


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def libvirt_answers() -> bool:
    return run("virsh", "-c", URI, "version", check=False).returncode == 0


def wait_until(predicate: Callable[[], bool], seconds: float) -> bool:
    """Set-up only: wait for a daemon started here to come up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def ensure_libvirt_accounts() -> None:
    """The groups, user and directories libvirtd expects (no systemd to make them here)."""
    for group in ("kvm", "libvirt", "libvirt-qemu"):
        if run("getent", "group", group, check=False).returncode != 0:
            run("groupadd", "--system", group)
    if run("getent", "passwd", "libvirt-qemu", check=False).returncode != 0:
        run("useradd", "--system", "--no-create-home", "--gid", "libvirt-qemu", "--groups",
            "kvm", "--shell", "/usr/sbin/nologin", "libvirt-qemu")
    for directory in ("/var/log/libvirt", "/var/lib/libvirt/qemu", "/run/libvirt"):
        Path(directory).mkdir(parents=True, exist_ok=True)
    # /dev/kvm that QEMU's user cannot open makes libvirt re-probe QEMU's capabilities on
    # every lookup (tens of seconds per domain start); Debian's udev rule is root:kvm 0660.
    kvm = Path("/dev/kvm")
    if kvm.exists():
        shutil.chown(kvm, group="kvm")
        kvm.chmod(0o660)


VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")


def virtlogd_listens() -> bool:
    """A connect, not the socket file: a file left from an earlier boot or a killed
    virtlogd refuses every domain start ("Connection refused")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(VIRTLOGD_SOCK))
        except PermissionError:
            return True  # root's socket, seen by another user: someone runs it
        except OSError:
            return False
    return True


def ensure_libvirtd() -> list[str]:
    """virtlogd and libvirtd on qemu:///system, each started when it does not answer (for
    the benchmarks and the test suite alike); the names of the daemons started here."""
    started = []
    if not virtlogd_listens():
        if os.geteuid() != 0:
            raise CannotRun("virtlogd does not run, and only root may start it")
        ensure_libvirt_accounts()
        run("virtlogd", "-d", check=False)
        started.append("virtlogd")
        if not wait_until(virtlogd_listens, 10):
            raise CannotRun(f"virtlogd does not listen on {VIRTLOGD_SOCK}")
    if libvirt_answers():
        return started
    if os.geteuid() != 0:
        raise CannotRun(f"libvirtd does not answer on {URI}, and only root may start it")
    ensure_libvirt_accounts()
    run("libvirtd", "-d", check=False)
    started.append("libvirtd")
    print("started libvirtd (left running)", file=sys.stderr)
    if not wait_until(libvirt_answers, 30):
        raise CannotRun(f"libvirtd does not answer on {URI}")
    return started


class Rig:
    """Everything made for one run, removed by close() in reverse order."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hostvold-bench-live-"))
        self.root.chmod(0o755)  # QEMU's user passes through to the share and the scratch disk
        self.base = self.root / "mnt"
        self.base.mkdir()
        self.undo: list[tuple[str, Any]] = []

    def shared_mount_base(self) -> None:
        run("mount", "--bind", str(self.base), str(self.base))
        self.undo.append(("umount", self.base))
        run("mount", "--make-rshared", str(self.base))

    def domain(self) -> str:
        import libvirt

        conn = libvirt.open(URI)
        name = f"hostvold-bench-{os.getpid()}"
        try:
            dom = conn.createXML(DOMAIN_XML.format(name=name), 0)
        except libvirt.libvirtError as exc:
            conn.close()
            raise CannotRun(f"no TCG domain can start here: {exc}") from None
        self.undo.append(("domain", (conn, dom)))
        return name

    def bus(self, name: str = "") -> str:
        from bench.scale import POLICY

        config = self.root / f"bus{name}.conf"
        config.write_text(POLICY.format(socket=self.root / f"bus{name}"))
        proc = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile", "--print-address=1",
                                 f"--config-file={config}"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        self.undo.append(("process", proc))
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            raise SystemExit("the private dbus-daemon did not start")
        return address

    def daemon(self, address: str, share_mib: int = 256, quiesce: str = "never",
               name: str = "") -> None:
        """A hostvold on a share of its own; ``name`` tells a second one's files apart."""
        root = self.root / f"daemon{name}"
        root.mkdir()
        image = root / "share.img"
        with open(image, "wb") as sparse:
            sparse.truncate(share_mib << 20)
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0",
            str(image))
        (root / "shares").write_text(f"{image} -t ext4 -o loop\n")
        config = root / "hostvold.conf"
        config.write_text(f"[daemon]\nstate_dir = {root / 'state'}\nbus = {address}\n"
                          f"[shares]\nshares_config = {root / 'shares'}\n"
                          f"mount_point_base = {self.base / f'shares{name}'}\n"
                          f"[libvirt]\nquiesce = {quiesce}\n")
        notify = root / "notify.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify))
        listener.settimeout(1)
        log = open(root / "hostvold.log", "w")  # noqa: SIM115 (the daemon's stderr)
        proc = subprocess.Popen([sys.executable, "-m", "hostvold", "--config", str(config)],
                                env=dict(environment(), NOTIFY_SOCKET=str(notify)),
                                cwd=REPO, stderr=log)
        self.undo.append(("process", proc))
        deadline = time.monotonic() + 60
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in listener.recv(4096):
                        return
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "hostvold.log").read_text().strip().splitlines()[-5:]
                    raise SystemExit("hostvold did not become ready: " + " | ".join(tail))
        finally:
            listener.close()
            log.close()

    def close(self) -> None:
        """The domain first (QEMU lets go of the files), then the rest in reverse order."""
        undo = sorted(reversed(self.undo), key=lambda step: step[0] != "domain")
        for kind, thing in undo:
            with contextlib.suppress(Exception):
                if kind == "domain":
                    conn, dom = thing
                    dom.destroy()
                    conn.close()
                elif kind == "process":
                    stop(thing)
                elif kind == "umount":
                    run("umount", "-R", "-l", str(thing))
        shutil.rmtree(self.root, ignore_errors=True)


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def environment() -> dict[str, str]:
    """This checkout first on the path, whatever the venv's editable install points at."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO))


def hostvolctl(address: str, *args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "hostvold.client", "--json", *args],
                          capture_output=True, text=True, timeout=300, cwd="/",
                          env=dict(environment(), HOSTVOLD_BUS=address))
    if done.returncode != 0:
        raise SystemExit(f"hostvolctl {' '.join(args)}: {done.stderr.strip()}")
    return dict(json.loads(done.stdout)) if done.stdout.strip() else {}


def needs() -> None:
    """Raise CannotRun when this host lacks what a live benchmark needs."""
    if os.geteuid() != 0:
        raise CannotRun("needs root (libvirtd on qemu:///system, loop mounts)")
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        raise CannotRun(f"missing {', '.join(missing)}")


@contextlib.contextmanager
def running(share_mib: int = 256) -> Iterator[tuple[Rig, str, str]]:
    """(the rig, its domain's name, its bus address) with hostvold ready; all of it removed
    on leaving. CannotRun when this host lacks what it needs."""
    needs()
    ensure_libvirtd()
    rig = Rig()
    try:
        rig.shared_mount_base()
        domain = rig.domain()
        address = rig.bus()
        rig.daemon(address, share_mib)
        yield rig, domain, address
    finally:
        rig.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        with running() as (_, domain, address):
            return measure(address, domain, args.rounds)
    except CannotRun as exc:
        print(exc, file=sys.stderr)
        return CANNOT_RUN


def measure(address: str, domain: str, rounds: int) -> int:
    """bench.live_latency against an 8 MiB volume attached to the rig's domain."""
    volume = str(hostvolctl(address, "create", "8M")["Id"])
    hostvolctl(address, "attach", volume, domain)
    # the bare calls' files on the volume's own filesystem: the same disk under both
    share = Path(str(hostvolctl(address, "connection-info", volume)["mount_point"]))
    result = subprocess.run(
        [sys.executable, "-m", "bench.live_latency", "--bus", address, "--volume", volume,
         "--domain", domain, "--scratch", str(share), "--rounds", str(rounds)],
        cwd=REPO, env=environment(), text=True, capture_output=True, timeout=900)
    sys.stderr.write(result.stderr)
    sys.stdout.write(result.stdout)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
