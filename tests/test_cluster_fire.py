"""Two minutes of bench/cluster_fire.py: three hosts over one share and one etcd, random
operations from three clients, and every kind of fault (hosts killed, stopped whole or
daemon alone for longer than the lease, cut from etcd; etcd restarted). The run must end
with every acknowledged volume and snapshot there holding its data, the hosts agreeing, and
no two hosts ever changing one volume at overlapping times (from the daemons' STEP lines)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, need

pytestmark = pytest.mark.integration


def test_two_minutes_of_faults_find_no_violation(tmp_path: Path,
                                                 loop_supported: bool) -> None:
    need(os.geteuid() == 0, "root (network namespaces, loop mounts)")
    need(loop_supported, "loop mounts of ext4 images (mount -o loop)")
    for tool, package in (("etcd", "etcd-server"), ("ip", "iproute2"), ("dbus-daemon", "dbus"),
                          ("qemu-io", "qemu-utils"), ("qemu-img", "qemu-utils")):
        need(shutil.which(tool) is not None, f"{tool} (Debian package {package})")
    result = subprocess.run(
        [sys.executable, "-m", "bench.cluster_fire", "--minutes", "2", "--seed", "20251207",
         "--settle", "30", "--dir", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=330)
    print(result.stdout[-20000:])
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    assert lines[-1].startswith("cluster_fire: ") and lines[-1].endswith(" 0 violations"), (
        result.stdout[-8000:] + result.stderr[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
