"""polkit decides for everyone outside root and the admin group (SPEC section 9): a real
polkitd on the test's own bus, hostvold's actions installed, and a JavaScript rule in
/etc/polkit-1/rules.d that gives one role (a backup user) only ``org.hostvold1.snapshot``.
Real users call through hostvolctl."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, DaemonProcess, Host, need
from tests.test_admin_group import NO_HYPERVISOR
from tests.test_dbus import (  # noqa: F401  (fixtures)
    ADMIN,
    READER,
    Cli,
    readable_package,
    users,
    with_bus,
)

pytestmark = pytest.mark.integration

POLKITD = Path("/usr/lib/polkit-1/polkitd")
ACTIONS = Path("/usr/share/polkit-1/actions/org.hostvold1.policy")
BACKUP = "hostvold-backup"  # a role: snapshots yes, volumes no
RULE = Path(f"/etc/polkit-1/rules.d/40-hostvold-test-{os.getpid()}.rules")
RULE_TEXT = f"""// written by hostvold's tests/test_polkit.py, removed when they end
polkit.addRule(function(action, subject) {{
    if (action.id == "org.hostvold1.snapshot" && subject.user == "{BACKUP}")
        return polkit.Result.YES;
}});
"""


class Polkitd:
    """polkitd on a private bus (it drops to its own user, as on a real system)."""

    def __init__(self, address: str, log: Path) -> None:
        self.address = address
        with open(log, "w") as out:
            self.proc = subprocess.Popen([str(POLKITD)], stdout=out, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address))
        deadline = time.monotonic() + 20
        while not self.owned():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"polkitd did not start: {log.read_text()}"
            time.sleep(0.1)  # the test's own wait for a process it started

    def owned(self) -> bool:
        result = subprocess.run(
            ["dbus-send", f"--bus={self.address}", "--print-reply",
             "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus.NameHasOwner", "string:org.freedesktop.PolicyKit1"],
            capture_output=True, text=True)
        return "boolean true" in result.stdout

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def backup_user(users: dict[str, str]) -> str:  # noqa: F811
    if subprocess.run(["id", BACKUP], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh",
                        BACKUP], check=True)
    return BACKUP


@pytest.fixture(scope="module")
def polkit_rule() -> Iterator[Path]:
    need(POLKITD.exists(), "polkitd (Debian package polkitd)")
    need(ACTIONS.exists() and ACTIONS.read_text() == (REPO / "systemd" /
                                                      "org.hostvold1.policy").read_text(),
         f"hostvold's polkit actions installed as {ACTIONS} (bash .ci/setup test does it)")
    RULE.write_text(RULE_TEXT)
    yield RULE
    RULE.unlink(missing_ok=True)


@pytest.fixture
def polkit_host(host_factory: Callable[..., Host], bus_factory: Callable[[str], str],
                daemon_factory: Callable[..., DaemonProcess], polkit_rule: Path,
                backup_user: str, readable_package: Path,  # noqa: F811
                tmp_path: Path) -> Iterator[tuple[Polkitd, DaemonProcess, Cli]]:
    address = bus_factory("polkit")
    polkitd = Polkitd(address, tmp_path / "polkitd.log")
    host = host_factory(512, extra=NO_HYPERVISOR)
    daemon = daemon_factory(with_bus(host, address))
    try:
        yield polkitd, daemon, Cli(address, readable_package)
    finally:
        if polkitd.proc.poll() is None:
            polkitd.stop()


def refused(result: subprocess.CompletedProcess[str], action: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "permission denied" in result.stderr, result.stderr
    assert action in result.stderr, result.stderr


def test_a_role_granted_snapshots_can_snapshot_and_nothing_more(
        polkit_host: tuple[Polkitd, DaemonProcess, Cli]) -> None:
    """The backup user, in no hostvold group, is granted org.hostvold1.snapshot by a rule:
    it takes, exports and deletes snapshots, and is refused deleting, extending or
    creating a volume (volume-manage), each refusal naming the action it lacks."""
    _, daemon, cli = polkit_host
    assert "then polkit (org.freedesktop.PolicyKit1) for everyone else" in daemon.log_text()
    vid = cli.json("create", "16M")["Id"]
    sid = cli.json("snapshot", "create", vid, user=BACKUP)["Id"]
    assert [s["Id"] for s in cli.json("snapshots", vid)] == [sid]
    refused(cli.run("delete", vid, user=BACKUP), "org.hostvold1.volume-manage")
    refused(cli.run("extend", vid, "32M", user=BACKUP), "org.hostvold1.volume-manage")
    refused(cli.run("create", "16M", user=BACKUP), "org.hostvold1.volume-manage")
    cli.json("snapshot", "delete", sid, user=BACKUP)
    assert cli.json("snapshots", vid) == []
    assert [v["Id"] for v in cli.json("volumes")] == [vid]
    assert cli.json("show", vid)["Size"] == 16 << 20
    assert "refused Volume.Delete (org.hostvold1.volume-manage)" in daemon.log_text()


def test_an_unprivileged_user_is_refused_every_change_and_may_read(
        polkit_host: tuple[Polkitd, DaemonProcess, Cli]) -> None:
    """A user no rule names: polkit says no (auth_admin, and no agent), so every change is
    refused and nothing changes; reading stays open (org.hostvold1.read is yes)."""
    _, _, cli = polkit_host
    vid = cli.json("create", "16M")["Id"]
    refused(cli.run("snapshot", "create", vid, user=READER), "org.hostvold1.snapshot")
    refused(cli.run("delete", vid, user=READER), "org.hostvold1.volume-manage")
    refused(cli.run("create", "16M", user=READER), "org.hostvold1.volume-manage")
    refused(cli.run("repair", vid, user=READER), "org.hostvold1.repair")
    assert [v["Id"] for v in cli.json("volumes", user=READER)] == [vid]
    assert cli.json("status", user=READER)["volumes"] == 1
    assert cli.json("snapshots", vid) == []


def test_root_and_the_admin_group_keep_their_rights(
        polkit_host: tuple[Polkitd, DaemonProcess, Cli]) -> None:
    """Root and the admin group are let through without asking polkit, which no rule
    would let them (auth_admin): the rights they had before polkit stay."""
    _, _, cli = polkit_host
    vid = cli.json("create", "16M", user=ADMIN)["Id"]
    cli.json("snapshot", "create", vid, user=ADMIN)
    cli.json("delete", vid, user=ADMIN)
    assert cli.json("volumes") == []


def test_without_polkitd_the_admin_group_alone_decides(
        polkit_host: tuple[Polkitd, DaemonProcess, Cli]) -> None:
    """polkitd stopped (not activatable on this bus): the role's grant is gone, the
    refusal says the admin group decides, and the admin group still works."""
    polkitd, _, cli = polkit_host
    vid = cli.json("create", "16M")["Id"]
    polkitd.stop()
    result = cli.run("snapshot", "create", vid, user=BACKUP)
    assert result.returncode != 0 and "membership of the group 'hostvold'" in result.stderr
    assert "polkit" not in result.stderr
    cli.json("snapshot", "create", vid, user=ADMIN)
