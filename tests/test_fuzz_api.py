"""Fuzz every method of every D-Bus interface (bench/fuzz_api.py), as root and as a real
admin-group user, against a real daemon on a private bus with hostvold's bus policy.

No crash, every refusal a named ``org.hostvold1.Error.*``, a refused call changes nothing
(checked by the fuzzer, call by call), no traceback in the daemon's log, no file
descriptor left open in the daemon, nothing written where the admin user cannot write."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Host
from tests.test_admin_group import running  # noqa: F401  (fixture)
from tests.test_dbus import ADMIN, Cli, users  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration
CALLS = {"root": 600, "admin": 600}  # at least 1,000 calls in all


@pytest.fixture
def tools() -> Iterator[Path]:
    """The fuzzer where the admin user can read it, and a scratch directory it owns."""
    root = Path(tempfile.mkdtemp(prefix="hostvold-fuzz-"))
    root.chmod(0o755)
    shutil.copy(REPO / "bench" / "fuzz_api.py", root / "fuzz_api.py")
    (root / "fuzz_api.py").chmod(0o644)
    for who in ("root", "admin"):
        (root / who).mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fuzz(tools: Path, address: str, who: str, seed: int) -> dict[str, Any]:
    argv = [sys.executable, str(tools / "fuzz_api.py"), "--bus", address, "--calls",
            str(CALLS[who]), "--seed", str(seed), "--scratch", str(tools / who)]
    if who == "admin":
        os.chown(tools / who, pwd.getpwnam(ADMIN).pw_uid, -1)
        argv = ["runuser", "-u", ADMIN, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=1200)
    assert result.stdout, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    print(who, "\n".join(lines[:2]), lines[-1], sep="\n")
    summary: dict[str, Any] = json.loads(lines[-2])  # the last line: the counts in words
    return summary


def test_fuzz_every_method(running: Callable[..., tuple[Host, Cli]],  # noqa: F811
                           users: dict[str, str], tools: Path) -> None:  # noqa: F811
    _, cli = running("hostvold")
    daemon = running.daemon  # type: ignore[attr-defined]
    address = cli.address
    for fmt in ("raw", "qcow2", "raw"):
        volume = cli.json("create", "4M", "--format", fmt)
        cli.json("snapshot", "create", volume["Id"])
    time.sleep(3)  # the creations' jobs and fds settle before counting
    fds_before = open_fds(daemon.proc.pid)
    outside = Path("/tmp/fuzz-out")
    seen: dict[str, int] = {}
    total = 0
    for who, seed in (("root", 1), ("admin", 2)):
        if who == "admin":
            for path in (outside, Path("/tmp/relative")):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        summary = fuzz(tools, address, who, seed)
        assert summary["violations"] == [], summary["violations"]
        assert summary["calls"] == CALLS[who]
        assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
        total += summary["calls"]
        for name, count in {**summary["errors"], **summary["job_errors"]}.items():
            seen[name] = seen.get(name, 0) + count
        if who == "admin":  # nothing the admin user asked for lands outside the shares
            assert not outside.exists()
            assert summary["errors"].get("org.hostvold1.Error.NotAuthorized", 0) > 0
    print(f"fuzz: {total} calls; distinct error names seen ({len(seen)}): "
          f"{', '.join(sorted(seen))}")
    assert total >= 1000
    assert all(name.startswith("org.hostvold1.Error.") for name in seen), seen
    assert {"org.hostvold1.Error.InvalidArgument", "org.hostvold1.Error.NotFound",
            "org.hostvold1.Error.NotAuthorized"} <= set(seen)
    log = daemon.log_text()
    assert "Traceback" not in log and "unexpectedly" not in log, log[-5000:]
    assert cli.json("status")["version"]
    time.sleep(3)  # descriptors that reached no method are closed after 2 s
    assert open_fds(daemon.proc.pid) <= fds_before + 2
