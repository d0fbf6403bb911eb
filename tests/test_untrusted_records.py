"""Files on the share are inputs, not trusted records (SPEC section 13): crafted operation
records in a metadata file, symbolic links and devices among a volume's files, and a raw
volume whose first bytes look like qcow2 and whose metadata file is lost."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hostvold.core.errors import (
    AlreadyExists,
    InfoFileDamaged,
    InvalidState,
    NeedsRepair,
    UnsafeFile,
    UnsafeImage,
)
from hostvold.ops.operations import Operations
from hostvold.storage.infofile import read_info
from hostvold.storage.metadata import read_meta, write_meta
from tests.conftest import Host
from tests.snapshot_lab import MiB, qemu_io

pytestmark = pytest.mark.integration


@pytest.fixture
async def host(host_factory: Callable[..., Host]) -> AsyncIterator[Host]:
    host = host_factory(256)
    await host.start()
    yield host
    host.stop()


def service_of(host: Host) -> Operations:
    assert host.daemon is not None and host.daemon.ops is not None
    return host.daemon.ops


def snapshot_of_tree(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``roots``: content digest and mtime (an unchanged tree compares ==)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file() and not path.is_symlink():
                found[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                    path.stat().st_mtime_ns)
    return found


@pytest.mark.parametrize("step", ["commit", "relink", "remove"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "other-volume"])
async def test_crafted_operation_record_changes_nothing(
        host: Host, tmp_path: Path, kind: str, step: str) -> None:
    service = service_of(host)
    victim = await service.create_volume(size=MiB, format="qcow2")
    other = await service.create_volume(size=MiB, format="qcow2")
    sid = (await host.ops.create_snapshot(victim.id)).id
    await host.ops.create_snapshot(other.id)
    files = service.store.files_of(victim)
    qemu_io(files.directory / read_info(files).active, "qcow2", ["write -P 0x33 0 64k"])
    share = files.directory
    dotdot = share.parent.parent / "x"  # what ../../x names from the share's directory
    dotdot.write_bytes(b"outside the share, reachable by ../../x\n")
    absolute = tmp_path / "elsewhere.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(absolute), "1M"],
                   check=True)
    bad = {"dotdot": "../../x", "absolute": str(absolute),
           "other-volume": f"volume-{other.id}"}[kind]
    meta = service.store.get_volume(victim.id)
    write_meta(files.meta, meta.evolve(operation={
        "name": "delete-snapshot", "snapshot": sid, "step": step, "top": bad,
        "base": bad if step != "commit" else files.base_name, "base_format": "qcow2",
        "higher": bad if step == "relink" else None}), 0o660)
    host.stop()
    (host.state_dir / "index.sqlite").unlink()  # the share alone describes the volumes
    before = snapshot_of_tree(share, absolute, dotdot)
    del before[str(files.meta)]  # the one file recovery may write: the problem is recorded
    service = await host.start()
    after = snapshot_of_tree(share, absolute, dotdot)
    del after[str(files.meta)]
    assert after == before
    assert dotdot.exists() and absolute.exists()
    problems = service.store.get_volume(victim.id).problems
    assert problems and problems[0].startswith("UntrustedRecord:"), problems
    assert repr(bad) in problems[0]
    assert service.store.get_volume(other.id).problems == []
    with pytest.raises((InvalidState, NeedsRepair)):  # no operation runs on it
        service.store.require_available(victim.id)
    # a repair discards the record and rebuilds nothing it does not see on disk
    done = await host.ops.repair(victim.id)
    assert any("untrusted operation record" in line for line in done)
    healed = service.store.get_volume(victim.id)
    assert healed.problems == [] and healed.operation is None
    assert snapshot_of_tree(absolute, dotdot) == {k: v for k, v in before.items()
                                                  if k in (str(absolute), str(dotdot))}
    qemu_io(files.directory / read_info(files).active, "qcow2", ["read -P 0x33 0 64k"])


async def test_symlinks_and_devices_among_a_volumes_files_are_refused(
        host: Host, tmp_path: Path) -> None:
    service = service_of(host)
    meta = await service.create_volume(size=MiB)
    files = service.store.files_of(meta)
    secret = tmp_path / "secret"
    secret.write_text("not the volume's\n")
    files.info.symlink_to(secret)
    with pytest.raises(InfoFileDamaged, match="symbolic link"):
        read_info(files)
    with pytest.raises(InfoFileDamaged):
        await service.extend_volume(meta.id, size=2 * MiB)
    assert "symbolic link" in service.store.get_volume(meta.id).problems[0]
    files.info.unlink()
    await service.store.record(files, meta)  # clear the recorded problem by hand for the next case
    shutil.move(files.base, tmp_path / "moved")
    files.base.symlink_to(tmp_path / "moved")
    with pytest.raises(UnsafeFile):
        await service.extend_volume(meta.id, size=2 * MiB)
    assert "symbolic link" in service.store.get_volume(meta.id).problems[0]
    assert (tmp_path / "moved").stat().st_size == MiB
    await service.store.record(files, meta)
    files.base.unlink()
    os.mkfifo(files.base)
    with pytest.raises(UnsafeFile):  # never opened: a FIFO would block the open
        await service.extend_volume(meta.id, size=2 * MiB)
    planted = files.directory / "volume-00000000-0000-4000-8000-0000000000aa"
    planted.symlink_to(tmp_path / "would-be-written")  # dangling: exists() says False
    with pytest.raises(AlreadyExists):
        await service.create_volume(size=MiB, id="00000000-0000-4000-8000-0000000000aa")
    assert not (tmp_path / "would-be-written").exists()
    meta_link = files.directory / f"volume-{meta.id}.meta"
    meta_link.unlink()
    meta_link.symlink_to(secret)
    with pytest.raises(UnsafeFile):
        read_meta(meta_link)


async def test_adopted_raw_volume_that_looks_like_qcow2(host: Host, tmp_path: Path) -> None:
    """Its metadata is gone and its first bytes (guest-written) are a qcow2 header naming a
    host file: listed as raw with a problem; confirming raw clears it; the data is intact."""
    service = service_of(host)
    meta = await service.create_volume(size=4 * MiB, format="raw")
    files = service.store.files_of(meta)
    disguise = tmp_path / "disguise.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow",
                    "-F", "raw", str(disguise), "64M"], check=True)
    header = disguise.read_bytes()[:65536]
    with open(files.base, "r+b") as image:  # what a guest can write to its raw disk
        image.write(header)
        image.seek(2 * MiB)
        image.write(b"guest data " * 1000)
    data = hashlib.sha256(files.base.read_bytes()).hexdigest()
    files.meta.unlink()
    host.stop()
    (host.state_dir / "index.sqlite").unlink()
    service = await host.start()
    adopted = service.store.get_volume(meta.id)
    assert adopted.format == "raw" and adopted.size == 4 * MiB
    assert len(adopted.problems) == 1
    problem = adopted.problems[0]
    assert problem.startswith("FormatUnconfirmed:") and "qcow2" in problem
    assert "virtual size 67108864" in problem and "/etc/shadow" in problem
    with pytest.raises(NeedsRepair):
        await host.ops.create_snapshot(meta.id)
    with pytest.raises(NeedsRepair, match="FormatUnconfirmed"):
        await host.ops.repair(meta.id)  # an explicit --format is needed
    with pytest.raises(UnsafeImage):  # a backing file outside the volume: refused
        await host.ops.repair(meta.id, "qcow2")
    assert service.store.get_volume(meta.id).problems == [problem]
    done = await host.ops.repair(meta.id, "raw")
    assert any("confirmed as raw" in line and "qcow2 v3 header" in line for line in done)
    confirmed = service.store.get_volume(meta.id)
    assert confirmed.format == "raw" and confirmed.problems == []
    assert confirmed.size == 4 * MiB
    assert hashlib.sha256(files.base.read_bytes()).hexdigest() == data
    snapshot = await host.ops.create_snapshot(meta.id)  # usable again, as raw
    assert read_info(files).snapshots == {snapshot.id: f"volume-{meta.id}.{snapshot.id}"}
    host.stop()
    service = await host.start()  # the confirmation is durable
    assert service.store.get_volume(meta.id).problems == []
