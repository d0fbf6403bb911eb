"""The D-Bus policy follows admin_group: rendered from the configured group, and checked at
start against the installed file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hostvold.server.policy import admitted_groups, check_installed, render
from tests.conftest import REPO


def test_committed_policy_is_the_rendered_default() -> None:
    """authorization = polkit by default: every user's call reaches the daemon, which
    decides (root, the admin group, then polkit); group: the bus itself refuses others."""
    committed = (REPO / "systemd" / "org.hostvold1.conf").read_text()
    assert committed == render("hostvold")
    assert admitted_groups(committed) == {"hostvold", "*"}
    assert admitted_groups(render("hostvold", polkit=False)) == {"hostvold"}


def test_policy_for_the_configured_group(tmp_path: Path) -> None:
    config = tmp_path / "hostvold.conf"
    config.write_text("[daemon]\nadmin_group = storage-ops\nauthorization = group\n")
    printed = subprocess.run([sys.executable, "-m", "hostvold.server.policy", "--config",
                              str(config)],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert admitted_groups(printed) == {"storage-ops"}
    group = subprocess.run([sys.executable, "-m", "hostvold.server.policy", "--config", str(config),
                            "--group"], capture_output=True, text=True, check=True, cwd=REPO)
    assert group.stdout == "storage-ops\n"


def test_installed_policy_is_checked_against_admin_group(tmp_path: Path) -> None:
    installed = tmp_path / "org.hostvold1.conf"
    installed.write_text(render("hostvold", polkit=False))
    assert check_installed("hostvold", (installed,), polkit=False) == []
    polkit = check_installed("hostvold", (installed,), polkit=True)
    assert len(polkit) == 1 and "what polkit grants anyone else never reaches" in polkit[0]
    installed.write_text(render("hostvold", polkit=True))
    assert check_installed("hostvold", (installed,), polkit=True) == []
    assert "the daemon alone refuses" in check_installed("hostvold", (installed,),
                                                         polkit=False)[0]
    installed.write_text(render("hostvold", polkit=False))
    warnings = check_installed("storage-ops", (installed,), polkit=False)
    assert len(warnings) == 2
    assert "members of 'storage-ops' are refused by the bus" in warnings[0]
    assert "['hostvold']" in warnings[1] and "python -m hostvold.server.policy" in warnings[1]
    missing = check_installed("hostvold", (tmp_path / "absent.conf",))
    assert len(missing) == 1 and "no D-Bus policy" in missing[0]
    installed.write_text("<busconfig")
    assert "not valid XML" in check_installed("hostvold", (installed,))[0]
