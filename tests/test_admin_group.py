"""The admin group is not root (SPEC sections 9 and 13): a real member of the ``hostvold``
group, through hostvolctl and raw D-Bus calls, against a real daemon on a private bus,
cannot read a host file its uid cannot read, nor make the daemon create or change a file
outside the shares; what it exports is its own file."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, Host
from tests.test_dbus import (  # noqa: F401  (fixtures)
    ADMIN,
    Cli,
    readable_package,
    users,
    with_bus,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20
HERE = Path(__file__).resolve().parent


class Scratch:
    """Directories for one test: a root-only secret, and the admin user's own directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hostvold-admin-test-"))
        self.root.chmod(0o755)
        self.marker = secrets.token_bytes(64)
        self.secret = self.root / "secret"
        self.secret.write_bytes(self.marker * (MiB // 64))
        self.secret.chmod(0o600)
        self.own = self.root / "own"
        self.own.mkdir()
        uid = pwd.getpwnam(ADMIN).pw_uid
        os.chown(self.own, uid, -1)
        self.own.chmod(0o700)
        self.uid = uid
        self.tools = self.root / "tools"
        self.tools.mkdir()
        shutil.copy(HERE / "bus_call.py", self.tools / "bus_call.py")
        for path in (self.tools, self.tools / "bus_call.py"):
            path.chmod(0o755)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# libvirt's in-process test driver: these tests need no hypervisor, and do not race with
# domains that other tests start and destroy on qemu:///system
NO_HYPERVISOR = "[libvirt]\nuri = test:///default\n"


@pytest.fixture
def running(host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
            daemon_factory: Callable[..., DaemonProcess]) -> Callable[..., tuple[Host, Cli]]:
    """A daemon on a private bus with hostvold's bus policy; ``running.daemon`` is it."""
    def start(policy: str = "hostvold", package: Path | None = None) -> tuple[Host, Cli]:
        address = bus_factory(policy)
        host = host_factory(1024, extra=NO_HYPERVISOR)
        start.daemon = daemon_factory(with_bus(host, address))  # type: ignore[attr-defined]
        return host, Cli(address, package)
    return start


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    made = Scratch()
    yield made
    made.cleanup()


def as_admin(*argv: str, umask: str = "022", package: Path | None = None,
             address: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the admin-group user with the venv's python."""
    script = f"umask {umask} && exec \"$@\""
    env = ["env", f"HOSTVOLD_BUS={address}"]
    if package is not None:
        env.append(f"PYTHONPATH={package}")
    return subprocess.run(["runuser", "-u", ADMIN, "--", *env, "sh", "-c", script, "sh",
                           *argv], capture_output=True, text=True, cwd="/", timeout=120)


def bus_call(scratch: Scratch, address: str, path: str, interface: str, member: str,
             options: dict[str, list[Any]]) -> dict[str, Any]:
    result = as_admin(sys.executable, str(scratch.tools / "bus_call.py"), address, path,
                      f"org.hostvold1.{interface}", member, json.dumps(options))
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def share_files(host: Host) -> dict[str, bytes]:
    found = {}
    for path in host.mount_point_base.rglob("*"):
        if path.is_file() and not path.is_symlink() and "lost+found" not in path.parts:
            found[str(path)] = path.read_bytes()
    return found


def holds(content: bytes, marker: bytes) -> bool:
    return marker[:32] in content


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_admin_cannot_get_a_root_file_into_a_volume(
        running: Callable[..., tuple[Host, Cli]], users: dict[str, str],  # noqa: F811
        readable_package: Path, scratch: Scratch) -> None:  # noqa: F811
    """Path, symbolic link and descriptor routes, through hostvolctl and raw D-Bus."""
    host, cli = running("hostvold", readable_package)
    link = scratch.own / "link"
    made = as_admin("ln", "-s", str(scratch.secret), str(link))
    assert made.returncode == 0, made.stderr

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return as_admin(sys.executable, "-m", "hostvold.client", *args, package=readable_package,
                        address=cli.address)

    for target in (scratch.secret, link):  # hostvolctl opens it with the user's rights
        result = ctl("import", str(target))
        assert result.returncode == 4, result.stderr
        assert "Permission denied" in result.stderr or "permission denied" in result.stderr
    refusals = {
        "source path": {"source": ["s", str(scratch.secret)]},
        "source symlink": {"source": ["s", str(link)]},
        "O_PATH descriptor": {"fd": ["fd", ["path", str(scratch.secret)]]},
        "O_PATH descriptor of the link": {"fd": ["fd", ["path", str(link)]]},
        "procfs": {"source": ["s", f"/proc/{os.getpid()}/root{scratch.secret}"]},
    }
    for what, options in refusals.items():
        answer = bus_call(scratch, cli.address, "/org/hostvold1", "Manager", "ImportVolume",
                          options)
        assert answer.get("error", "").startswith("org.hostvold1.Error."), (what, answer)
        assert answer["error"] in ("org.hostvold1.Error.NotAuthorized",
                                   "org.hostvold1.Error.InvalidArgument"), (what, answer)
    # a descriptor the user could open itself is fine, and only that file's bytes arrive
    own = scratch.own / "mine.raw"
    as_admin("truncate", "-s", "1M", str(own))
    answer = bus_call(scratch, cli.address, "/org/hostvold1", "Manager", "ImportVolume",
                      {"fd": ["fd", ["ro", str(own)]]})
    assert "reply" in answer, answer
    imported = cli.json("volumes")
    assert len(imported) <= 1
    assert not any(holds(content, scratch.marker) for content in share_files(host).values())


def test_admin_cannot_make_the_daemon_write_outside_the_shares(
        running: Callable[..., tuple[Host, Cli]], users: dict[str, str],  # noqa: F811
        readable_package: Path, scratch: Scratch) -> None:  # noqa: F811
    host, cli = running("hostvold", readable_package)
    volume = cli.json("create", "4M")
    vid, path = volume["Id"], volume["path"]
    mount = Path(cli.json("shares")[0]["MountPoint"])
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M",
                    str(mount / f"volume-{vid}")], check=True, capture_output=True)
    outside = scratch.root / "root-only"
    outside.mkdir(mode=0o755)
    watched = {p: digest(p) for p in (Path("/etc/passwd"), scratch.secret)}

    def ctl(*args: str, umask: str = "022") -> subprocess.CompletedProcess[str]:
        return as_admin(sys.executable, "-m", "hostvold.client", *args, package=readable_package,
                        address=cli.address, umask=umask)

    denied = ctl("export", vid, str(outside / "cron-job"))
    assert denied.returncode == 4 and "Permission denied" in denied.stderr, denied.stderr
    attempts = {
        "destination path": {"destination": ["s", str(outside / "x")]},
        "read-only fd of /etc/passwd": {"fd": ["fd", ["ro", "/etc/passwd"]]},
        "O_PATH fd of the secret": {"fd": ["fd", ["path", str(scratch.secret)]]},
        "O_PATH fd of a root directory": {"fd": ["fd", ["path", str(outside)]]},
        "directory": {"fd": ["fd", ["ro", str(scratch.own)]]},
    }
    for what, options in attempts.items():
        answer = bus_call(scratch, cli.address, path, "Volume", "Export", options)
        assert answer.get("error") in ("org.hostvold1.Error.NotAuthorized",
                                       "org.hostvold1.Error.InvalidArgument"), (what, answer)
    daemon = running.daemon  # type: ignore[attr-defined]
    own = {n: os.readlink(f"/proc/{daemon.proc.pid}/fd/{n}")
           for n in map(int, os.listdir(f"/proc/{daemon.proc.pid}/fd"))}
    index = host.state_dir / "index.sqlite"
    before = digest(index)
    for number in own:  # a bare index, no descriptor in the message: never the daemon's own
        for member, kind in (("Export", "Volume"), ("ImportVolume", "Manager")):
            target = path if kind == "Volume" else "/org/hostvold1"
            answer = bus_call(scratch, cli.address, target, kind, member,
                              {"fd": ["h", number]})
            assert answer.get("error") == "org.hostvold1.Error.InvalidArgument", answer
    assert digest(index) == before and len(cli.json("volumes")) == 1
    assert list(outside.iterdir()) == []
    assert {p: digest(p) for p in watched} == watched
    # the export the user makes is the user's own file, with the user's umask
    mine = scratch.own / "backup.raw"
    done = ctl("--json", "export", vid, str(mine), umask="077")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["State"] == "completed"
    st = mine.stat()
    assert st.st_uid == scratch.uid and stat.S_IMODE(st.st_mode) == 0o600
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(mine),
                           str(mount / f"volume-{vid}")], capture_output=True).returncode == 0
    # an export that fails leaves no file behind (hostvolctl removes the file it made)
    failed = ctl("export", "00000000-0000-4000-8000-000000000000", str(scratch.own / "x.raw"))
    assert failed.returncode == 1 and "NotFound" in failed.stderr
    assert not (scratch.own / "x.raw").exists()
    # and an import of the user's own file works, from hostvolctl
    imported = ctl("--json", "import", str(mine))
    assert imported.returncode == 0, imported.stderr
    new = json.loads(imported.stdout)
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(mine),
                           str(mount / f"volume-{new['Id']}")],
                          capture_output=True).returncode == 0
    assert not any(holds(content, scratch.marker) for content in share_files(host).values())


def test_operator_confirms_the_format_of_an_adopted_volume(
        host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
        daemon_factory: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """hostvolctl shows what the header claims and `repair --format` confirms it."""
    address = bus_factory("hostvold")
    host = host_factory(256, extra=NO_HYPERVISOR)
    config = with_bus(host, address)
    first = daemon_factory(config)
    cli = Cli(address)
    vid = cli.json("create", "4M", "--format", "raw")["Id"]
    mount = Path(cli.json("shares")[0]["MountPoint"])
    assert first.stop() == 0
    disguise = tmp_path / "disguise.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F",
                    "raw", str(disguise), "64M"], check=True)
    base = mount / f"volume-{vid}"
    with open(base, "r+b") as image:  # a guest wrote a qcow2 header on its raw disk
        image.write(disguise.read_bytes()[:65536])
    data = digest(base)
    (mount / f"volume-{vid}.meta").unlink()
    (host.state_dir / "index.sqlite").unlink()
    daemon_factory(config)
    shown = cli.json("show", vid)
    assert shown["Format"] == "raw" and shown["Problems"][0].startswith("FormatUnconfirmed:")
    assert "qcow2 v3 header" in shown["Problems"][0]
    assert "/etc/shadow" in cli.run("volumes").stdout  # the listing shows the claim
    refused = cli.run("repair", vid)
    assert refused.returncode == 1 and "FormatUnconfirmed" in refused.stderr
    done = cli.run("repair", vid, "--format", "raw")
    assert done.returncode == 0 and "confirmed as raw" in done.stdout, done.stderr
    assert cli.json("show", vid)["Problems"] == []
    assert digest(base) == data
