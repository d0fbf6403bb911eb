"""The mount base made shared at start: shares mounted before stay in sight, shares mounted
after reach a mount namespace made before (as libvirt makes one per domain)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostvold.storage.reach import _mount_of, ensure_shared_mount
from tests.conftest import run, umount_all

pytestmark = pytest.mark.integration


def test_shared_mount_base_keeps_earlier_shares_and_propagates_later_ones(
        tmp_path: Path, ext4_image: Callable[..., Path]) -> None:
    # a private mount around the base, as on a host without systemd ("/" private), whatever
    # this host's own "/" is: the daemon has something to fix
    around = tmp_path / "host"
    around.mkdir()
    run("mount", "--bind", str(around), str(around))
    run("mount", "--make-private", str(around))
    base = around / "mnt"
    early, late = base / "early", base / "late"
    early.mkdir(parents=True)
    late.mkdir()
    run("mount", "-o", "loop", "-t", "ext4", str(ext4_image("early", 16)), str(early))
    (early / "volume-a").write_bytes(b"guest data")
    holder = None
    try:
        assert "shared:" not in _mount_of(base)[1]
        assert ensure_shared_mount(base) is not None
        assert "shared:" in _mount_of(base)[1]
        assert (early / "volume-a").read_bytes() == b"guest data"  # not hidden by the bind
        assert ensure_shared_mount(base) is None  # the second start changes nothing

        # a namespace that exists before the late mount, as a running domain's does
        holder = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged",
                                   "sleep", "60"])
        time.sleep(0.2)
        run("mount", "-o", "loop", "-t", "ext4", str(ext4_image("late", 16)), str(late))
        (late / "volume-b").write_bytes(b"later")
        seen = run("nsenter", "-t", str(holder.pid), "-m", "cat", str(late / "volume-b"))
        assert seen.stdout == "later"
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        umount_all(around)
