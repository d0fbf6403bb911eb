"""A full share (SPEC section 10): work that writes data checks the space first and
refuses with NoSpace; an ENOSPC that still comes mid-way is NoSpace too, and the operation
stays recorded and is finished by a retry once space is freed. Real qemu-img on a small
loop-mounted ext4 share (real ENOSPC)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hostvold.core.errors import NoSpace
from hostvold.ops.operations import Operations

MiB = 1 << 20


def qemu_io(path: Path, fmt: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], check=True,
                          capture_output=True, text=True)


def leave_free(mount: Path, free: int) -> Path:
    """A filler file that leaves about ``free`` bytes on the share."""
    st = os.statvfs(mount)
    filler = mount / "filler"
    size = st.f_bavail * st.f_frsize - free
    subprocess.run(["fallocate", "-l", str(size), str(filler)], check=True)
    return filler


async def snapshot_with_changes(service: Operations) -> tuple[str, str, Path]:
    """A raw volume; snapshot S1, 100 MiB written over it, snapshot S2: deleting S1
    merges those 100 MiB into the base."""
    meta = await service.create_volume(size=160 * MiB)
    files = service.store.files_of(meta)
    s1 = (await service.create_snapshot(meta.id)).id
    active = files.directory / service.store.get_volume(meta.id).active
    qemu_io(active, "qcow2", "write -P 0x22 0 100M")
    await service.create_snapshot(meta.id)
    return meta.id, s1, files.directory


def reads(directory: Path, service: Operations, volume_id: str) -> bool:
    active = directory / service.store.get_volume(volume_id).active
    out = qemu_io(active, "qcow2", "read -P 0x22 0 100M").stdout
    return "Pattern verification failed" not in out


async def test_delete_refused_before_it_starts(service: Operations) -> None:
    volume_id, s1, directory = await snapshot_with_changes(service)
    filler = leave_free(directory, 20 * MiB)
    before = sorted(os.listdir(directory))
    with pytest.raises(NoSpace, match=r"needs up to \d+ bytes .* which has \d+ free"):
        await service.delete_snapshot(volume_id, s1)
    assert sorted(os.listdir(directory)) == before
    meta = service.store.get_volume(volume_id)
    assert meta.operation is None and s1 in meta.snapshots
    filler.unlink()
    await service.delete_snapshot(volume_id, s1)
    assert s1 not in service.store.get_volume(volume_id).snapshots
    assert reads(directory, service, volume_id)


async def test_enospc_mid_way_is_nospace_and_a_retry_finishes(
        service: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer fills the share after the check: qemu-img commit hits ENOSPC."""
    volume_id, s1, directory = await snapshot_with_changes(service)

    async def no_check(*_args: object) -> None:
        return None

    monkeypatch.setattr("hostvold.ops.snapshots.require_space", no_check)
    filler = leave_free(directory, 20 * MiB)
    with pytest.raises(NoSpace, match=r"No space left on device.*retry"):
        await service.delete_snapshot(volume_id, s1)
    meta = service.store.get_volume(volume_id)
    assert (meta.operation or {}).get("name") == "delete-snapshot"  # recorded: resumable
    assert reads(directory, service, volume_id)  # the chain still reads every write
    filler.unlink()
    await service.delete_snapshot(volume_id, s1)  # the retry finishes it
    meta = service.store.get_volume(volume_id)
    assert meta.operation is None and s1 not in meta.snapshots
    assert reads(directory, service, volume_id)
