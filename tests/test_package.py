"""The Debian package (``make deb``): installed, run, removed and installed again.

Uses the newest ``dist/hostvold_*.deb`` of the repository, or the file ``HOSTVOLD_DEB``
names. The installed ``/usr/sbin/hostvold`` runs on a private bus that includes the
installed bus policy, with a temporary state directory and a loop-mounted share (never
``/var/lib/hostvold``); the installed ``/usr/bin/hostvolctl`` creates a volume. Then
``dpkg -r`` must keep the (edited) conffile and the volume, and after ``dpkg -i`` the
conffile is unchanged and the daemon, started again, lists the volume.

The machine is left as it was found: the package is removed again when it was not
installed before (purged too when ``/var/lib/hostvold`` did not exist before, so a purge
never touches a state directory someone else uses), and the files outside the venv that
the package shares with the dev set-up (``.ci/setup`` installs completion, bus policy,
unit, README unowned) get their previous contents back. ``/opt/hostvold/venv`` and
``/usr/local/bin`` are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, DaemonProcess, Host, PrivateBus, need

pytestmark = pytest.mark.integration

VENV = Path("/usr/lib/hostvold")
DAEMON = Path("/usr/sbin/hostvold")
CLIENT = Path("/usr/bin/hostvolctl")
CONFFILE = Path("/etc/hostvold/hostvold.conf")
UNIT = Path("/lib/systemd/system/hostvold.service")
POLICY = Path("/usr/share/dbus-1/system.d/org.hostvold1.conf")
ACTIVATION = Path("/usr/share/dbus-1/system-services/org.hostvold1.service")
STATE = Path("/var/lib/hostvold")
# a hostvold.conf already there (unowned, from a dev set-up) is kept, never asked about
DPKG_FORCE = ["--force-confdef", "--force-confold"]
# the installed programs must use the installed venv, never the checkout under test
CLEAN_ENV = {"PYTHONPATH": ""}


def built_deb() -> Path | None:
    named = os.environ.get("HOSTVOLD_DEB")
    if named:
        return Path(named).resolve()
    found = sorted((REPO / "dist").glob("hostvold_*.deb"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def package_status() -> str:
    """dpkg's status of hostvold: "installed", "config-files" or "" (not known)."""
    result = sh("dpkg-query", "-W", "-f=${db:Status-Status}", "hostvold", check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def shipped_paths(deb: Path) -> list[Path]:
    """The regular files the package puts outside its venv."""
    paths = []
    for line in sh("dpkg-deb", "-c", str(deb)).stdout.splitlines():
        fields = line.split()
        name = fields[5].removeprefix(".")
        if fields[0].startswith("-") and not name.startswith(str(VENV)):
            paths.append(Path(name))
    return paths


def venv_processes() -> list[str]:
    """Command lines of running processes of the installed venv."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit():
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if str(VENV) in cmdline:
                    found.append(cmdline)
    return found


class Installed:
    def __init__(self, deb: Path, state_before: bool) -> None:
        self.deb = deb
        self.state_before = state_before  # /var/lib/hostvold existed before the install


@pytest.fixture
def package() -> Iterator[Installed]:
    """The built .deb, installed; afterwards the machine as it was."""
    need(os.geteuid() == 0, "root (dpkg)")
    need(shutil.which("apt-get") is not None and shutil.which("dpkg") is not None,
         "apt-get and dpkg")
    deb = built_deb()
    need(deb is not None and deb.is_file(),
         "the built package: make deb (dist/hostvold_*.deb) or HOSTVOLD_DEB=PATH")
    assert deb is not None
    installed_before = package_status() == "installed"
    state_before = STATE.exists()
    saved = {path: path.read_bytes() for path in [*shipped_paths(deb), CONFFILE]
             if path.is_file()}
    sh("apt-get", "install", "-y", "-q", "--no-install-recommends",
       *[f"-oDpkg::Options::={option}" for option in DPKG_FORCE], str(deb))
    try:
        yield Installed(deb, state_before)
    finally:
        if not installed_before and package_status():
            sh("dpkg", "-r", "hostvold", check=False)
            if not state_before:
                sh("dpkg", "--purge", "hostvold", check=False)
        for path, content in saved.items():
            if not path.exists() or path.read_bytes() != content:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)


def hostvolctl(address: str, *args: str) -> Any:
    result = subprocess.run([str(CLIENT), "--json", *args], capture_output=True, text=True,
                            env=dict(os.environ, HOSTVOLD_BUS=address, **CLEAN_ENV), cwd="/",
                            timeout=120)
    assert result.returncode == 0, f"hostvolctl {args}: {result.stderr}"
    return json.loads(result.stdout)


def test_package_install_run_remove_reinstall(
        package: Installed, host_factory: Callable[..., Host],
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    started = time.monotonic()
    # what the package put where
    assert package_status() == "installed"
    assert DAEMON.resolve() == VENV / "bin" / "hostvold"
    assert CLIENT.resolve() == VENV / "bin" / "hostvolctl"
    assert (VENV / "bin" / "python").resolve() == Path("/usr/bin/python3").resolve()
    listed = set(sh("dpkg", "-L", "hostvold").stdout.split())
    for name in ("/usr/share/man/man1/hostvolctl.1.gz", "/usr/share/man/man8/hostvold.8.gz",
                 "/usr/share/man/man5/hostvold.conf.5.gz",
                 "/usr/share/bash-completion/completions/hostvolctl",
                 "/usr/share/doc/hostvold/README.md", str(POLICY), str(ACTIVATION), str(UNIT),
                 str(CONFFILE)):
        assert name in listed, name
    if (REPO / "systemd" / "org.hostvold1.policy").exists():
        assert "/usr/share/polkit-1/actions/org.hostvold1.policy" in listed
    conffiles = sh("dpkg-query", "-W", "-f=${Conffiles}", "hostvold").stdout
    assert str(CONFFILE) in conffiles
    assert "Exec=/usr/sbin/hostvold" in ACTIVATION.read_text().splitlines()
    assert sh("getent", "group", "hostvold").returncode == 0  # the default admin_group
    assert STATE.is_dir()
    # the unit: the package's path, enabled (with its bus alias), not started by the install
    unit = UNIT.read_text()
    assert "ExecStart=/usr/sbin/hostvold" in unit.splitlines()
    assert Path("/etc/systemd/system/multi-user.target.wants/hostvold.service").is_symlink()
    assert Path("/etc/systemd/system/dbus-org.hostvold1.service").is_symlink()
    assert venv_processes() == []
    verify = sh("systemd-analyze", "verify", str(UNIT), check=False)
    assert verify.returncode == 0, verify.stderr
    assert not [line for line in verify.stderr.splitlines() if "hostvold.service" in line], \
        verify.stderr

    # the installed daemon on a bus with the installed policy, the installed client
    bus = PrivateBus(f"<include>{POLICY}</include>")
    try:
        need(bool(bus.address) and bus.proc.poll() is None, "a private dbus-daemon")
        host = host_factory(256)
        host.config_text = host.config_text.replace(
            "[daemon]\n", f"[daemon]\nbus = {bus.address}\n", 1)
        config = host.config_file
        daemon = daemon_factory(config, CLEAN_ENV, command=[str(DAEMON)])
        assert str(VENV / "bin" / "python") in " ".join(venv_processes())
        volume = hostvolctl(bus.address, "create", "64M")
        volume_id = volume["Id"]
        path = Path(hostvolctl(bus.address, "connection-info", volume_id)["path"])
        assert path.is_file() and path.stat().st_size == 64 << 20
        assert daemon.stop() == 0

        # dpkg -r: programs gone; the edited conffile, the volume and the group stay
        with CONFFILE.open("a") as conf:
            conf.write("# an operator's edit (tests/test_package.py)\n")
        edited = CONFFILE.read_bytes()
        sh("dpkg", "-r", "hostvold")
        assert package_status() == "config-files"
        assert not DAEMON.exists() and not CLIENT.exists() and not UNIT.exists()
        assert not (VENV / "bin" / "python").exists()
        assert CONFFILE.read_bytes() == edited
        assert path.is_file()
        assert sh("getent", "group", "hostvold").returncode == 0

        # dpkg -i again: the conffile as the operator left it, the volume served again
        sh("dpkg", "-i", *DPKG_FORCE, str(package.deb))
        assert package_status() == "installed"
        assert CONFFILE.read_bytes() == edited
        daemon = daemon_factory(config, CLEAN_ENV, command=[str(DAEMON)])
        assert [v["Id"] for v in hostvolctl(bus.address, "volumes")] == [volume_id]
        assert daemon.stop() == 0
    finally:
        bus.close()

    # dpkg --purge: hostvold's own state goes, a volume in the embedded share never does
    # (only when the package made /var/lib/hostvold: nobody else's state is touched)
    if not package.state_before:
        share_volume = STATE / "share" / f"volume-{volume_id}"
        share_volume.parent.mkdir()
        share_volume.write_bytes(b"data")
        (STATE / "index.sqlite").write_bytes(b"")
        (STATE / "locks").mkdir()
        (STATE / "locks" / f"{volume_id}.lock").write_bytes(b"")
        sh("dpkg", "--purge", "hostvold")
        assert package_status() == ""
        assert not CONFFILE.exists()
        assert share_volume.read_bytes() == b"data"
        assert sorted(p.name for p in STATE.iterdir()) == ["share"]
        shutil.rmtree(STATE)
    print(f"package test: {time.monotonic() - started:.1f} s")
