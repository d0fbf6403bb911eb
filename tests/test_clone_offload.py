"""Copies between files of one filesystem are offloaded (copy_file_range): on an XFS share
with reflink a clone shares the source's extents, takes no extra space and stays an
independent volume; where the filesystem cannot share (ext4), the same call copies."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hostvold.storage.infofile import read_info
from tests.conftest import Host, need
from tests.snapshot_lab import qemu_io

pytestmark = pytest.mark.integration
MiB = 1 << 20
DATA = 128 * MiB


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shared_extents(path: Path) -> int:
    """Bytes of ``path`` in extents the filesystem marks shared (FIEMAP flag 0x2000)."""
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap -v", str(path)], check=True,
                         capture_output=True, text=True).stdout
    total = 0
    for line in out.splitlines():
        found = re.match(r"\s*\d+: \[(\d+)\.\.(\d+)\]:\s+\d+\.\.\d+\s+\d+\s+0x([0-9a-f]+)", line)
        if found and int(found.group(3), 16) & 0x2000:
            total += (int(found.group(2)) - int(found.group(1)) + 1) * 512
    return total


@pytest.fixture
def xfs_host(host_factory: Callable[..., Host]) -> Host:
    need(subprocess.run(["sh", "-c", "command -v mkfs.xfs xfs_io"],
                        capture_output=True).returncode == 0, "mkfs.xfs and xfs_io (xfsprogs)")
    return host_factory(512, fs="xfs")


async def test_clone_on_reflink_share_shares_extents_and_stays_independent(
        xfs_host: Host) -> None:
    ops = await xfs_host.start()
    source = await ops.create_volume(size=256 * MiB, format="raw")
    source_file = ops.store.files_of(source).base
    qemu_io(source_file, "raw", [f"write -P 0x5a 0 {DATA}"])
    os.sync()
    before = used_bytes(source_file.parent)

    clone = await ops.clone(source.id)
    clone_file = ops.store.files_of(clone).base
    os.sync()
    assert used_bytes(source_file.parent) - before < 8 * MiB  # no second copy of the data
    assert shared_extents(clone_file) >= DATA
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source_file),
                    str(clone_file)], check=True, capture_output=True)

    qemu_io(clone_file, "raw", [f"write -P 0x33 0 {MiB}"])  # copy on write: apart from here
    qemu_io(source_file, "raw", [f"read -P 0x5a 0 {DATA}"], read_only=True)
    qemu_io(clone_file, "raw", [f"read -P 0x33 0 {MiB}", f"read -P 0x5a {MiB} {DATA - MiB}"],
            read_only=True)


async def test_volume_from_snapshot_on_reflink_share_shares_extents(xfs_host: Host) -> None:
    ops = await xfs_host.start()
    source = await ops.create_volume(size=256 * MiB, format="raw")
    files = ops.store.files_of(source)
    qemu_io(files.base, "raw", [f"write -P 0x21 0 {DATA}"])
    snapshot = await ops.create_snapshot(source.id)
    overlay = files.directory / read_info(files).active
    qemu_io(overlay, "qcow2", [f"write -P 0x22 0 {MiB}"])  # after the snapshot: not in it

    made = await ops.create_from_snapshot(source.id, snapshot.id, format="raw")
    made_file = ops.store.files_of(made).base
    assert shared_extents(made_file) >= DATA - MiB
    qemu_io(made_file, "raw", [f"read -P 0x21 0 {DATA}"], read_only=True)


async def test_clone_on_ext4_falls_back_to_a_copy(host_factory: Callable[..., Host]) -> None:
    host = host_factory(256)
    ops = await host.start()
    source = await ops.create_volume(size=64 * MiB, format="raw")
    source_file = ops.store.files_of(source).base
    qemu_io(source_file, "raw", [f"write -P 0x44 0 {16 * MiB}"])
    for fmt in ("raw", "qcow2"):  # no reflink on ext4: the same call copies
        clone = await ops.clone(source.id, format=fmt)
        qemu_io(ops.store.files_of(clone).base, fmt, [f"read -P 0x44 0 {16 * MiB}"],
                read_only=True)
