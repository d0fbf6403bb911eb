"""The sshfs rig itself: a real share that hangs when its link is cut, comes back through
the same mount when the link returns, and leaves nothing behind."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need
from tests.sshfs_fixtures import ADDRESS_PATTERN, OPTIONS_PATTERN, SshfsRig, mounts, sh, wait_for

pytestmark = pytest.mark.integration


def state(process: subprocess.Popen[bytes]) -> str:
    """The kernel's scheduling state of a process (S, D, ...); '-' once it has gone."""
    try:
        return Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "-"


def read_back(path: Path, seconds: float) -> float:
    """Seconds until ``cat path`` succeeds; a reader that hangs is left to the release."""
    started, reader = time.monotonic(), None
    while time.monotonic() - started < seconds:
        if reader is None or reader.poll() is not None:
            if reader is not None and reader.returncode == 0:
                return time.monotonic() - started
            reader = subprocess.Popen(["cat", str(path)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        time.sleep(0.05)
    raise AssertionError(f"{path} not readable {seconds} s after the link came back")


def test_a_cut_link_hangs_the_mount_and_restore_brings_it_back(
        sshfs_rig: SshfsRig, tmp_path: Path) -> None:
    need(shutil.which("stat") is not None, "stat (coreutils)")
    rig = sshfs_rig
    assert OPTIONS_PATTERN.fullmatch(rig.options), rig.options
    assert ADDRESS_PATTERN.match(rig.address), rig.address
    assert rig.shares_line == f"{rig.address} -t fuse.sshfs -o {rig.options}"
    point = tmp_path / "mnt"
    point.mkdir()
    sh("mount", "-t", "fuse.sshfs", "-o", rig.options, rig.address, str(point), timeout=30)
    probes: list[subprocess.Popen[bytes]] = []
    try:
        (point / "hello").write_text("over ssh")
        assert (rig.export / "hello").read_text() == "over ssh"
        assert (point / "hello").read_text() == "over ssh"

        rig.cut()
        # what was in flight fails when ssh gives up (ServerAlive, ~4 s); from then on each
        # request waits in sshfs's reconnect, whose SYNs the cut link drops
        gave_up = wait_for(lambda: not rig.client_pids(), 10, "ssh giving up on the dead link")
        probes += [subprocess.Popen(["stat", str(point / "hello")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for _ in range(2)]
        with pytest.raises(subprocess.TimeoutExpired):
            probes[0].wait(3)
        assert probes[1].poll() is None
        asleep = state(probes[0])
        probes[1].kill()  # its request is with sshfs already: not even SIGKILL ends the wait
        wait_for(lambda: state(probes[1]) == "D", 2, "the killed stat in state D")

        restoring = time.monotonic()
        rig.restore()
        restored = time.monotonic() - restoring
        recovered = read_back(point / "hello", 15)
        probes[0].wait(10)  # the stat that hung is answered too
        assert probes[0].returncode == 0
        print(f"\nssh gave up {gave_up:.1f} s after the cut; a stat then hung (state "
              f"{asleep}; D once killed); restore() took {restored:.2f} s, the file read "
              f"back {recovered:.2f} s after")
    finally:
        rig.release(point)
        for probe in probes:
            probe.kill()
            probe.wait(10)  # released: nothing can sleep on the mount any more

    rig.close()
    assert not [where for _, where, _, source in mounts() if source == rig.address]
    assert rig.namespace not in sh("ip", "netns", "list").stdout
    assert rig.root_if not in sh("ip", "-o", "link").stdout
    assert rig.subnet not in sh("ip", "-4", "route").stdout
    assert rig.sshd is not None and rig.sshd.poll() is not None
    wait_for(lambda: not rig.processes(), 5, "sshd, sshfs and ssh of the rig gone")
